//! Loading the datapath: map capacities, pins under bpffs (reused when a
//! previous instance kept them), runtime configuration, the `lb_tc_pod`
//! program attached with tcx to pod-facing interfaces, `lb_xdp_ext` (XDP)
//! and `lb_tc_ext` (tcx) on the external interfaces, and the orderly
//! reverse on shutdown.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::{Array, MapError};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier, TcAttach, TcAttachType, Xdp, XdpMode,
};
use aya::{Ebpf, EbpfError, EbpfLoader};
use lb_common::config::{CONFIG_F_XDP_NO_TX, DatapathConfig, defaults};
use lb_common::names::{
    ALL_MAPS, MAP_AFFINITY, MAP_BACKENDS, MAP_CONFIG, MAP_CONNTRACK, MAP_MAGLEV, MAP_MEMBERS,
    MAP_REVNAT, MAP_SERVICES, MAP_SLOTS, MAP_SNAT, MAP_SOURCE_RANGES, PROG_TC_EXTERNAL,
    PROG_TC_POD, PROG_XDP_EXTERNAL,
};
use tracing::{debug, info, warn};

use super::maps::{AyaMaps, OpenMapError};

/// `f_type` of a BPF filesystem (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The Maglev table size a configuration asks for (0: the default).
pub fn maglev_table_size(config: &DatapathConfig) -> u32 {
    match config.maglev_table_size {
        0 => defaults::MAGLEV_TABLE_SIZE,
        size => size,
    }
}

/// Capacities of the maps, fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Frontends (`LB_SERVICES` entries).
    pub services: u32,
    /// Distinct backends (`LB_BACKENDS` and `LB_REVNAT` entries).
    pub backends: u32,
    /// Slots summed over every service (`LB_SLOTS` entries).
    pub slots: u32,
    /// Tracked flows (`LB_CONNTRACK` entries).
    pub flows: u32,
    /// Session affinities (`LB_AFFINITY` entries, LRU).
    pub affinities: u32,
    /// Services that can use Maglev at once (`LB_MAGLEV` holds this many
    /// tables of the configured size, 4 bytes an entry).
    pub maglev_tables: u32,
    /// Source-translated flows (`LB_SNAT` entries, LRU).
    pub snat_flows: u32,
    /// Client ranges of `loadBalancerSourceRanges` over all services
    /// (`LB_SRC_RANGES` entries).
    pub source_ranges: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            services: defaults::MAX_SERVICES,
            backends: defaults::MAX_BACKENDS,
            slots: defaults::MAX_SLOTS,
            flows: defaults::MAX_FLOWS,
            affinities: defaults::MAX_AFFINITIES,
            maglev_tables: defaults::MAX_MAGLEV_TABLES,
            snat_flows: defaults::MAX_SNAT_FLOWS,
            source_ranges: defaults::MAX_SOURCE_RANGES,
        }
    }
}

/// Everything [`Datapath::load`] needs.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where the maps are pinned as `<pin_dir>/<MAP_NAME>`.
    pub pin_dir: PathBuf,
    pub capacities: Capacities,
    /// Written into `LB_CONFIG` (flags, timeouts, SNAT and hairpin
    /// addresses, NAT ports); [`Datapath::set_snat_addr`] changes it later.
    pub config: DatapathConfig,
}

/// Loading, attaching or unpinning failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "{} is not on a BPF filesystem (is bpffs mounted? `mount -t bpf bpf /sys/fs/bpf`)",
        .0.display()
    )]
    NotBpffs(PathBuf),
    #[error("checking the filesystem of {}", path.display())]
    Statfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another lb-agent is using the pin directory {} (one directory per instance: see --pin-dir)",
        .0.display()
    )]
    PinDirInUse(PathBuf),
    #[error("locking the pin directory {}", path.display())]
    LockPinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the pin directory {}", path.display())]
    CreatePinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the map {map} pinned in {} does not fit this agent: its {property} is {actual}, this agent needs {expected}; \
         start with the --max-* options it was created with, or remove {} (its tracked flows are lost)",
        pin_dir.display(),
        pin_dir.display()
    )]
    IncompatiblePin {
        map: String,
        pin_dir: PathBuf,
        property: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("loading the datapath object")]
    Object(#[source] EbpfError),
    #[error("the datapath object has no program {0} (an lb-ebpf build without it?)")]
    MissingProgram(&'static str),
    #[error("{program} is not {expected}")]
    ProgramType {
        program: &'static str,
        expected: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("loading {0} into the kernel")]
    LoadProgram(&'static str, #[source] ProgramError),
    #[error("interface name {0:?} contains a NUL byte")]
    InterfaceName(String),
    #[error("attaching {program} at tcx ingress of {iface}")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "attaching {PROG_XDP_EXTERNAL} to {iface}: native (driver) mode failed ({native}), \
         and generic (SKB) mode too"
    )]
    AttachXdp {
        iface: String,
        /// Why native mode failed, with its causes.
        native: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("{iface} is already an external interface")]
    AlreadyExternal { iface: String },
    #[error("detaching {program} from {iface}")]
    Detach {
        program: &'static str,
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("the datapath object has no map {MAP_CONFIG}")]
    MissingConfig,
    #[error("writing {MAP_CONFIG}")]
    Config(#[source] MapError),
    #[error(transparent)]
    Maps(#[from] OpenMapError),
    #[error("starting the datapath logger (--datapath-log); was lb-ebpf built with aya-log?")]
    Logger(#[source] aya_log::Error),
    #[error("removing the pin {}", path.display())]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A loaded datapath: the object with its program, the pins, the links.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// Holds an exclusive flock on the pin directory while this instance
    /// lives (the kernel drops it when the process exits, even by crash).
    _pin_dir_lock: File,
    reused_pins: Vec<&'static str>,
    /// `lb_tc_pod` on pod-facing interfaces.
    links: Vec<(String, SchedClassifierLinkId)>,
    /// `lb_xdp_ext` and `lb_tc_ext` on external interfaces.
    external: Vec<ExternalLinks>,
    /// Whether `lb_xdp_ext` and `lb_tc_ext` are loaded (on the first
    /// external interface: an object without them still serves pods).
    external_loaded: bool,
    /// What `LB_CONFIG` holds.
    config: DatapathConfig,
    maglev_table_size: u32,
}

/// The two attachments of one external interface.
#[derive(Debug)]
struct ExternalLinks {
    iface: String,
    xdp: XdpLinkId,
    xdp_mode: XdpMode,
    tc: SchedClassifierLinkId,
}

/// Whether native XDP failing with `error` is worth a try in generic (SKB)
/// mode: yes when the kernel refused the attachment (a driver without
/// native XDP says `EOPNOTSUPP`; generic XDP works on any interface), no
/// when the interface or the program is the problem, which generic mode
/// shares.
pub fn xdp_generic_fallback(error: &ProgramError) -> bool {
    !matches!(
        error,
        ProgramError::UnknownInterface { .. }
            | ProgramError::IOError(_)
            | ProgramError::NotLoaded
            | ProgramError::AlreadyAttached
    )
}

/// How `lb_xdp_ext` forwards what it must forward by FIB lookup (SNAT
/// flows, their replies, replies of external flows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpForwarding {
    /// `XDP_TX` back out of the arrival interface when the route leads
    /// there and the neighbour is known; everything else through
    /// `lb_tc_ext`. The fastest path where the uplink delivers `XDP_TX`
    /// frames promptly (a NIC's driver does).
    Transmit,
    /// Nothing transmitted by XDP: every packet to forward goes to
    /// `lb_tc_ext` untouched (`CONFIG_F_XDP_NO_TX`), which redirects it
    /// with `bpf_redirect_neigh`.
    Tc,
}

impl XdpForwarding {
    /// How logs and `--xdp-forward` name it.
    pub fn name(self) -> &'static str {
        match self {
            XdpForwarding::Transmit => "tx",
            XdpForwarding::Tc => "tc",
        }
    }

    /// `flags` with `CONFIG_F_XDP_NO_TX` set or cleared for this mode.
    pub fn apply(self, flags: u32) -> u32 {
        match self {
            XdpForwarding::Transmit => flags & !CONFIG_F_XDP_NO_TX,
            XdpForwarding::Tc => flags | CONFIG_F_XDP_NO_TX,
        }
    }

    /// The mode `LB_CONFIG` flags say.
    pub fn of(config: &DatapathConfig) -> Self {
        if config.flags & CONFIG_F_XDP_NO_TX != 0 {
            XdpForwarding::Tc
        } else {
            XdpForwarding::Transmit
        }
    }
}

/// `--xdp-forward`: a mode, or `Auto` to choose by the external
/// interfaces' drivers ([`choose_xdp_forwarding`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpForwardChoice {
    #[default]
    Auto,
    Fixed(XdpForwarding),
}

/// The driver that makes `XDP_TX` unreliable as a forward: the kernel's
/// veth driver only schedules the peer's NAPI after an `XDP_TX` burst if
/// the peer has an XDP program of its own (`veth_xdp_flush`); otherwise
/// the frames wait until unrelated traffic wakes it. A node whose uplink
/// is a veth (kind, containers as nodes) cannot put a program on the
/// peer, which lives in the host or another namespace.
pub const VETH_DRIVER: &str = "veth";

/// What [`choose_xdp_forwarding`] decided, and why (for the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpForwardingDecision {
    pub forwarding: XdpForwarding,
    pub reason: String,
}

/// Chooses how XDP forwards, for the whole agent (one `LB_CONFIG`).
/// `drivers` are the external interfaces with their driver names (or why
/// it could not be read). A fixed `choice` wins. `Auto`: `tc` if any
/// external interface is a veth (and says which, and that the others
/// would have allowed `tx`), `tx` otherwise; an interface whose driver
/// could not be read counts as not a veth (a veth always answers).
pub fn choose_xdp_forwarding(
    choice: XdpForwardChoice,
    drivers: &[(String, Result<String, String>)],
) -> XdpForwardingDecision {
    if let XdpForwardChoice::Fixed(forwarding) = choice {
        return XdpForwardingDecision {
            forwarding,
            reason: format!("--xdp-forward {}", forwarding.name()),
        };
    }
    let describe = |(iface, driver): &(String, Result<String, String>)| match driver {
        Ok(driver) => format!("{iface} ({driver})"),
        Err(error) => format!("{iface} (driver unknown: {error})"),
    };
    let (veths, others): (Vec<_>, Vec<_>) = drivers
        .iter()
        .partition(|(_, driver)| driver.as_deref() == Ok(VETH_DRIVER));
    let others: Vec<String> = others.into_iter().map(describe).collect();
    if veths.is_empty() {
        let reason = if others.is_empty() {
            "no external interface".to_owned()
        } else {
            format!("no external interface is a veth: {}", others.join(", "))
        };
        return XdpForwardingDecision {
            forwarding: XdpForwarding::Transmit,
            reason,
        };
    }
    let veths: Vec<&str> = veths.iter().map(|(iface, _)| iface.as_str()).collect();
    let mut reason = format!(
        "{} is a veth, whose peer takes XDP_TX frames only if it has an XDP program of its own",
        veths.join(", ")
    );
    if !others.is_empty() {
        reason.push_str(&format!(
            "; one mode per agent, so also on {}",
            others.join(", ")
        ));
    }
    XdpForwardingDecision {
        forwarding: XdpForwarding::Tc,
        reason,
    }
}

/// Network byte order, as `LB_CONFIG` holds addresses.
fn addr_be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("reused_pins", &self.reused_pins)
            .field("links", &self.links)
            .field("external", &self.external)
            .finish_non_exhaustive()
    }
}

/// Checks that `dir` is, or would be created, on bpffs.
fn check_bpffs(dir: &Path) -> Result<(), LoadError> {
    let existing = dir
        .ancestors()
        .find(|ancestor| ancestor.exists())
        .unwrap_or(Path::new("/"));
    let path = CString::new(existing.as_os_str().as_bytes())
        .map_err(|_| LoadError::NotBpffs(dir.to_owned()))?;
    // SAFETY: statfs only writes into the zeroed struct we own; the path is
    // a valid NUL-terminated string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(LoadError::Statfs {
            path: existing.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs by architecture"
    )]
    if stat.f_type as i64 != BPF_FS_MAGIC {
        return Err(LoadError::NotBpffs(existing.to_owned()));
    }
    Ok(())
}

/// How long a start waits for the pin directory's lock before it decides
/// another agent owns it. The lock can be held for a moment by an instance
/// that is exiting (a rolling restart), or by a child process forked by
/// another thread of the previous owner's process between its fork and
/// exec (a flock belongs to the open file, which the child shares until
/// exec closes it).
const PIN_DIR_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Takes an exclusive lock on the pin directory, so two agents never
/// share (and fight over) one set of maps.
fn lock_pin_dir(pin_dir: &Path) -> Result<File, LoadError> {
    let lock_error = |source| LoadError::LockPinDir {
        path: pin_dir.to_owned(),
        source,
    };
    let dir = File::open(pin_dir).map_err(lock_error)?;
    let deadline = Instant::now() + PIN_DIR_LOCK_WAIT;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(dir);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::WouldBlock {
            return Err(lock_error(error));
        }
        if Instant::now() >= deadline {
            return Err(LoadError::PinDirInUse(pin_dir.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Datapath {
    /// Loads the embedded object, sizing its maps and pinning them under
    /// `options.pin_dir` (reusing pins that exist, so a restarted agent
    /// keeps its flows), writes `LB_CONFIG` and loads `lb_tc_pod`. Nothing is
    /// attached yet. On failure, pins this call created are removed.
    pub fn load(options: &LoadOptions) -> Result<Self, LoadError> {
        let pin_dir = &options.pin_dir;
        check_bpffs(pin_dir)?;
        let created_dir = !pin_dir.exists();
        std::fs::create_dir_all(pin_dir).map_err(|source| LoadError::CreatePinDir {
            path: pin_dir.clone(),
            source,
        })?;
        let pin_dir_lock = lock_pin_dir(pin_dir)?;
        let reused_pins: Vec<&'static str> = ALL_MAPS
            .into_iter()
            .filter(|name| pin_dir.join(name).exists())
            .collect();

        let result = Self::load_object(options).and_then(|mut ebpf| {
            Self::write_config(&mut ebpf, options.config)?;
            classifier(&mut ebpf, PROG_TC_POD)?
                .load()
                .map_err(|error| LoadError::LoadProgram(PROG_TC_POD, error))?;
            Ok(ebpf)
        });
        match result {
            Ok(ebpf) => {
                if reused_pins.is_empty() {
                    info!(pin_dir = %pin_dir.display(), "datapath loaded, maps pinned");
                } else {
                    info!(
                        pin_dir = %pin_dir.display(),
                        reused = ?reused_pins,
                        "datapath loaded, reusing pinned maps (and their flows)"
                    );
                }
                Ok(Self {
                    ebpf,
                    pin_dir: pin_dir.clone(),
                    _pin_dir_lock: pin_dir_lock,
                    reused_pins,
                    links: Vec::new(),
                    external: Vec::new(),
                    external_loaded: false,
                    config: options.config,
                    maglev_table_size: maglev_table_size(&options.config),
                })
            }
            Err(error) => {
                for name in ALL_MAPS
                    .into_iter()
                    .filter(|name| !reused_pins.contains(name))
                {
                    // Best effort: the original error is the one to report.
                    let _ = std::fs::remove_file(pin_dir.join(name));
                }
                if created_dir {
                    let _ = std::fs::remove_dir(pin_dir);
                }
                Err(error)
            }
        }
    }

    fn load_object(options: &LoadOptions) -> Result<Ebpf, LoadError> {
        let capacities = options.capacities;
        let pins: Vec<(&'static str, PathBuf)> = ALL_MAPS
            .into_iter()
            .map(|name| (name, options.pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_SERVICES, capacities.services)
            .map_max_entries(MAP_SLOTS, capacities.slots)
            .map_max_entries(MAP_BACKENDS, capacities.backends)
            .map_max_entries(MAP_REVNAT, capacities.backends)
            .map_max_entries(MAP_CONNTRACK, capacities.flows)
            // One member per slot.
            .map_max_entries(MAP_MEMBERS, capacities.slots)
            .map_max_entries(MAP_AFFINITY, capacities.affinities)
            .map_max_entries(MAP_SNAT, capacities.snat_flows)
            .map_max_entries(MAP_SOURCE_RANGES, capacities.source_ranges)
            .map_max_entries(
                MAP_MAGLEV,
                capacities
                    .maglev_tables
                    .saturating_mul(maglev_table_size(&options.config)),
            );
        for (name, path) in &pins {
            // Creates and pins the map, or opens the existing pin after
            // checking its type, sizes and flags against the object.
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .load(crate::EBPF_OBJECT)
            .map_err(|error| match error {
                EbpfError::MapError(MapError::IncompatiblePinnedMap {
                    name,
                    property,
                    expected,
                    actual,
                }) => LoadError::IncompatiblePin {
                    map: name,
                    pin_dir: options.pin_dir.clone(),
                    property,
                    expected,
                    actual,
                },
                other => LoadError::Object(other),
            })
    }

    /// Entries per Maglev table the datapath uses.
    pub fn maglev_table_size(&self) -> u32 {
        self.maglev_table_size
    }

    fn write_config(ebpf: &mut Ebpf, config: DatapathConfig) -> Result<(), LoadError> {
        let map = ebpf.map_mut(MAP_CONFIG).ok_or(LoadError::MissingConfig)?;
        let mut array: Array<_, DatapathConfig> =
            Array::try_from(map).map_err(LoadError::Config)?;
        array.set(0, &config, 0).map_err(LoadError::Config)?;
        debug!(?config, "datapath configuration written");
        Ok(())
    }

    /// What `LB_CONFIG` holds.
    pub fn config(&self) -> DatapathConfig {
        self.config
    }

    /// Sets the address external flows to backends on other nodes are
    /// source-translated to (`0.0.0.0`: none, such flows are dropped),
    /// rewriting `LB_CONFIG` if it changed. Whether it changed.
    pub fn set_snat_addr(&mut self, addr: Ipv4Addr) -> Result<bool, LoadError> {
        let snat_addr = addr_be(addr);
        if snat_addr == self.config.snat_addr {
            return Ok(false);
        }
        let config = DatapathConfig {
            snat_addr,
            ..self.config
        };
        Self::write_config(&mut self.ebpf, config)?;
        self.config = config;
        Ok(true)
    }

    /// Sets how `lb_xdp_ext` forwards (`CONFIG_F_XDP_NO_TX`), rewriting
    /// `LB_CONFIG` if it changed. Whether it changed.
    pub fn set_xdp_forwarding(&mut self, forwarding: XdpForwarding) -> Result<bool, LoadError> {
        let flags = forwarding.apply(self.config.flags);
        if flags == self.config.flags {
            return Ok(false);
        }
        let config = DatapathConfig {
            flags,
            ..self.config
        };
        Self::write_config(&mut self.ebpf, config)?;
        self.config = config;
        Ok(true)
    }

    /// How `lb_xdp_ext` forwards, as `LB_CONFIG` says.
    pub fn xdp_forwarding(&self) -> XdpForwarding {
        XdpForwarding::of(&self.config)
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Maps whose pins existed before this load and were reused.
    pub fn reused_pins(&self) -> &[&'static str] {
        &self.reused_pins
    }

    /// Takes the maps the writer programs out of the object (the program
    /// keeps its own references to them).
    pub fn take_maps(&mut self) -> Result<AyaMaps, LoadError> {
        Ok(AyaMaps::from_maps(|name| self.ebpf.take_map(name))?
            .with_maglev_table_size(self.maglev_table_size))
    }

    /// Starts forwarding the datapath's aya-log records to the `log` crate
    /// (and so to `tracing`). The caller polls it when its fd is readable.
    pub fn start_logger(
        &mut self,
    ) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, LoadError> {
        aya_log::EbpfLogger::init(&mut self.ebpf).map_err(LoadError::Logger)
    }

    /// Attaches `lb_tc_pod` at tcx ingress of `iface`, before any program
    /// already there so a service packet is translated before anything
    /// (a CNI's redirect, say) routes it.
    pub fn attach(&mut self, iface: &str) -> Result<(), LoadError> {
        let name = CString::new(iface).map_err(|_| LoadError::InterfaceName(iface.to_owned()))?;
        let link = attach_tcx(&mut self.ebpf, PROG_TC_POD, &name, iface)?;
        self.links.push((iface.to_owned(), link));
        info!(iface, "attached {PROG_TC_POD} at tcx ingress");
        Ok(())
    }

    /// Loads `lb_xdp_ext` and `lb_tc_ext` into the kernel, once. Called by
    /// [`Datapath::attach_external`]; calling it earlier makes a missing or
    /// rejected program fail the start before anything is attached.
    pub fn load_external(&mut self) -> Result<(), LoadError> {
        if self.external_loaded {
            return Ok(());
        }
        xdp_program(&mut self.ebpf)?
            .load()
            .map_err(|error| LoadError::LoadProgram(PROG_XDP_EXTERNAL, error))?;
        classifier(&mut self.ebpf, PROG_TC_EXTERNAL)?
            .load()
            .map_err(|error| LoadError::LoadProgram(PROG_TC_EXTERNAL, error))?;
        self.external_loaded = true;
        info!("loaded {PROG_XDP_EXTERNAL} and {PROG_TC_EXTERNAL}");
        Ok(())
    }

    /// Attaches the external path to `iface` (an interface of the node's
    /// network, `--external`): `lb_xdp_ext` in native (driver) XDP mode,
    /// or in generic (SKB) mode with a warning where the driver has no
    /// native XDP; and `lb_tc_ext` at tcx ingress, first, for what XDP
    /// hands on. Returns the XDP mode used.
    pub fn attach_external(&mut self, iface: &str) -> Result<XdpMode, LoadError> {
        if self.external.iter().any(|links| links.iface == iface) {
            return Err(LoadError::AlreadyExternal {
                iface: iface.to_owned(),
            });
        }
        let name = CString::new(iface).map_err(|_| LoadError::InterfaceName(iface.to_owned()))?;
        self.load_external()?;
        let xdp = xdp_program(&mut self.ebpf)?;
        let (xdp_link, xdp_mode) = match xdp.attach(name.as_c_str(), XdpMode::Driver) {
            Ok(link) => (link, XdpMode::Driver),
            Err(native) if xdp_generic_fallback(&native) => {
                let native = crate::agent::error_chain(&native);
                let link = xdp
                    .attach(name.as_c_str(), XdpMode::Skb)
                    .map_err(|source| LoadError::AttachXdp {
                        iface: iface.to_owned(),
                        native: native.clone(),
                        source: Box::new(source),
                    })?;
                warn!(
                    iface,
                    error = native.as_str(),
                    "{iface} refused native XDP: {PROG_XDP_EXTERNAL} runs in generic (SKB) mode, slower"
                );
                (link, XdpMode::Skb)
            }
            Err(source) => {
                return Err(LoadError::AttachXdp {
                    iface: iface.to_owned(),
                    native: crate::agent::error_chain(&source),
                    source: Box::new(source),
                });
            }
        };
        let tc_link = match attach_tcx(&mut self.ebpf, PROG_TC_EXTERNAL, &name, iface) {
            Ok(link) => link,
            Err(error) => {
                // Half an external path is worse than none: XDP would hand
                // packets to a TC program that is not there.
                let detached = xdp_program(&mut self.ebpf).and_then(|xdp| {
                    xdp.detach(xdp_link)
                        .map_err(|source| detach_error(PROG_XDP_EXTERNAL, iface, source))
                });
                if let Err(detach) = detached {
                    warn!(iface, "{}", crate::agent::error_chain(&detach));
                }
                return Err(error);
            }
        };
        self.external.push(ExternalLinks {
            iface: iface.to_owned(),
            xdp: xdp_link,
            xdp_mode,
            tc: tc_link,
        });
        info!(
            iface,
            xdp_mode = xdp_mode_name(xdp_mode),
            "attached {PROG_XDP_EXTERNAL} ({} XDP) and {PROG_TC_EXTERNAL} (tcx ingress)",
            xdp_mode_name(xdp_mode)
        );
        Ok(xdp_mode)
    }

    /// The external interfaces and the XDP mode of each.
    pub fn external(&self) -> impl Iterator<Item = (&str, XdpMode)> {
        self.external
            .iter()
            .map(|links| (links.iface.as_str(), links.xdp_mode))
    }

    /// Detaches both programs from one external interface.
    fn detach_external(ebpf: &mut Ebpf, links: ExternalLinks) -> Result<(), LoadError> {
        let ExternalLinks { iface, xdp, tc, .. } = links;
        let xdp_result = xdp_program(ebpf).and_then(|program| {
            program
                .detach(xdp)
                .map_err(|error| detach_error(PROG_XDP_EXTERNAL, &iface, error))
        });
        let tc_result = classifier(ebpf, PROG_TC_EXTERNAL).and_then(|program| {
            program
                .detach(tc)
                .map_err(|error| detach_error(PROG_TC_EXTERNAL, &iface, error))
        });
        xdp_result.and(tc_result)?;
        info!(
            iface = iface.as_str(),
            "detached {PROG_XDP_EXTERNAL} and {PROG_TC_EXTERNAL}"
        );
        Ok(())
    }

    /// Detaches from `iface`, if attached. Also for an interface that is
    /// gone (a deleted pod's veth): the kernel has already cut its tcx link,
    /// and this releases the link's descriptor.
    pub fn detach(&mut self, iface: &str) -> Result<(), LoadError> {
        let Some(position) = self.links.iter().position(|(name, _)| name == iface) else {
            return Ok(());
        };
        let (iface, link) = self.links.swap_remove(position);
        classifier(&mut self.ebpf, PROG_TC_POD)?
            .detach(link)
            .map_err(|source| detach_error(PROG_TC_POD, &iface, source))?;
        info!(iface, "detached {PROG_TC_POD}");
        Ok(())
    }

    /// Interfaces the program is attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.links.iter().map(|(iface, _)| iface.as_str())
    }

    /// Detaches from every interface (pod-facing and external), then removes the pins and the pin
    /// directory unless `keep_pins` (the next start then reuses the maps and
    /// their flows). Every step is tried; the first error is returned.
    pub fn shutdown(mut self, keep_pins: bool) -> Result<(), LoadError> {
        let mut first_error = None;
        let links = std::mem::take(&mut self.links);
        for (iface, link) in links {
            let detached = classifier(&mut self.ebpf, PROG_TC_POD).and_then(|program| {
                program
                    .detach(link)
                    .map_err(|source| detach_error(PROG_TC_POD, &iface, source))
            });
            match detached {
                Ok(()) => info!(iface, "detached {PROG_TC_POD}"),
                Err(error) => {
                    warn!(iface, error = %error, "detach failed");
                    first_error.get_or_insert(error);
                }
            }
        }
        for links in std::mem::take(&mut self.external) {
            if let Err(error) = Self::detach_external(&mut self.ebpf, links) {
                warn!(error = %error, "detach failed");
                first_error.get_or_insert(error);
            }
        }
        if keep_pins {
            info!(pin_dir = %self.pin_dir.display(), "keeping pinned maps (--keep-pins)");
        } else if let Err(error) = unpin(&self.pin_dir) {
            first_error.get_or_insert(error);
        } else {
            info!(pin_dir = %self.pin_dir.display(), "pinned maps removed");
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// The TC classifier `name` of the object.
fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::ProgramType {
            program: name,
            expected: "a TC classifier",
            source,
        })
}

/// `lb_xdp_ext`.
fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    ebpf.program_mut(PROG_XDP_EXTERNAL)
        .ok_or(LoadError::MissingProgram(PROG_XDP_EXTERNAL))?
        .try_into()
        .map_err(|source| LoadError::ProgramType {
            program: PROG_XDP_EXTERNAL,
            expected: "an XDP program",
            source,
        })
}

/// Attaches the classifier `program` at tcx ingress of `iface`, before any
/// program already there, so a service packet is translated before
/// anything (a CNI's redirect, say) routes it.
fn attach_tcx(
    ebpf: &mut Ebpf,
    program: &'static str,
    name: &std::ffi::CStr,
    iface: &str,
) -> Result<SchedClassifierLinkId, LoadError> {
    classifier(ebpf, program)?
        .attach(
            name,
            TcAttach::Tcx {
                attach_type: TcAttachType::Ingress,
                order: LinkOrder::first(),
            },
        )
        .map_err(|source| LoadError::Attach {
            program,
            iface: iface.to_owned(),
            source: Box::new(source),
        })
}

fn detach_error(program: &'static str, iface: &str, source: ProgramError) -> LoadError {
    LoadError::Detach {
        program,
        iface: iface.to_owned(),
        source: Box::new(source),
    }
}

/// How logs name an XDP mode.
pub fn xdp_mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Default => "default",
        XdpMode::Skb => "generic",
        XdpMode::Driver => "native",
        XdpMode::Hardware => "offloaded",
    }
}

/// Removes every map pin of an instance and then its directory (kept, with
/// a warning, if something else lives there).
pub fn unpin(pin_dir: &Path) -> Result<(), LoadError> {
    for name in ALL_MAPS {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(LoadError::Unpin { path, source }),
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::DirectoryNotEmpty => {
            warn!(pin_dir = %pin_dir.display(), "pin directory not removed: it holds other files");
            Ok(())
        }
        Err(source) => Err(LoadError::Unpin {
            path: pin_dir.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya::sys::SyscallError;

    #[test]
    fn generic_xdp_is_tried_when_the_kernel_refuses_native_mode() {
        // What a driver without native XDP answers bpf_link_create with.
        let refused = ProgramError::SyscallError(SyscallError {
            call: "bpf_link_create",
            io_error: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        });
        assert!(xdp_generic_fallback(&refused));
    }

    #[test]
    fn generic_xdp_is_not_tried_for_a_missing_interface_or_program() {
        let missing = ProgramError::UnknownInterface {
            name: CString::new("nope0").unwrap(),
        };
        assert!(!xdp_generic_fallback(&missing));
        assert!(!xdp_generic_fallback(&ProgramError::IOError(
            io::Error::from_raw_os_error(libc::EPERM)
        )));
        assert!(!xdp_generic_fallback(&ProgramError::NotLoaded));
    }

    fn drivers(list: &[(&str, Result<&str, &str>)]) -> Vec<(String, Result<String, String>)> {
        list.iter()
            .map(|(iface, driver)| {
                (
                    (*iface).to_owned(),
                    driver.map(str::to_owned).map_err(str::to_owned),
                )
            })
            .collect()
    }

    #[test]
    fn auto_forwards_through_tc_on_a_veth_uplink() {
        let decision =
            choose_xdp_forwarding(XdpForwardChoice::Auto, &drivers(&[("eth0", Ok("veth"))]));
        assert_eq!(decision.forwarding, XdpForwarding::Tc);
        assert!(
            decision.reason.contains("eth0 is a veth"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn auto_transmits_from_xdp_on_other_drivers() {
        for list in [
            vec![("eth0", Ok("mlx5_core"))],
            vec![("eth0", Ok("ixgbe")), ("br0", Ok("bridge"))],
            // A driver that cannot be named is not a veth (a veth answers).
            vec![("eth0", Err("Operation not supported"))],
            vec![],
        ] {
            let decision = choose_xdp_forwarding(XdpForwardChoice::Auto, &drivers(&list));
            assert_eq!(decision.forwarding, XdpForwarding::Transmit, "{list:?}");
        }
    }

    #[test]
    fn auto_chooses_tc_when_external_interfaces_disagree_and_says_so() {
        let decision = choose_xdp_forwarding(
            XdpForwardChoice::Auto,
            &drivers(&[("eth0", Ok("ixgbe")), ("eth1", Ok("veth"))]),
        );
        assert_eq!(decision.forwarding, XdpForwarding::Tc);
        assert!(
            decision.reason.contains("eth1 is a veth"),
            "{}",
            decision.reason
        );
        assert!(
            decision.reason.contains("also on eth0 (ixgbe)"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn a_fixed_choice_wins_over_the_drivers() {
        let veth = drivers(&[("eth0", Ok("veth"))]);
        let nic = drivers(&[("eth0", Ok("ice"))]);
        let tx = XdpForwardChoice::Fixed(XdpForwarding::Transmit);
        let tc = XdpForwardChoice::Fixed(XdpForwarding::Tc);
        assert_eq!(
            choose_xdp_forwarding(tx, &veth).forwarding,
            XdpForwarding::Transmit
        );
        assert_eq!(
            choose_xdp_forwarding(tc, &nic).forwarding,
            XdpForwarding::Tc
        );
        assert_eq!(choose_xdp_forwarding(tc, &nic).reason, "--xdp-forward tc");
    }

    #[test]
    fn forwarding_modes_map_to_the_config_flag() {
        let flags = lb_common::config::CONFIG_F_LOG;
        let tc = XdpForwarding::Tc.apply(flags);
        assert_eq!(tc, flags | CONFIG_F_XDP_NO_TX);
        assert_eq!(XdpForwarding::Transmit.apply(tc), flags);
        let config = DatapathConfig {
            flags: tc,
            ..DatapathConfig::DEFAULT
        };
        assert_eq!(XdpForwarding::of(&config), XdpForwarding::Tc);
        assert_eq!(
            XdpForwarding::of(&DatapathConfig::DEFAULT),
            XdpForwarding::Transmit
        );
    }

    #[test]
    fn addresses_are_written_in_network_byte_order() {
        let addr = addr_be(Ipv4Addr::new(198, 18, 254, 2));
        assert_eq!(addr.to_ne_bytes(), [198, 18, 254, 2]);
        assert_eq!(
            addr_be(Ipv4Addr::from(defaults::HAIRPIN_ADDR)),
            DatapathConfig::DEFAULT.hairpin_addr
        );
    }
}
