//! `lb-agent run`: load the datapath, wait for the source's initial state
//! and program it, attach, then apply every change of the source until
//! SIGINT/SIGTERM, and undo it all on the way out.
//!
//! Two sources feed the same translation and the same writer: a directory
//! of manifests ([`ManifestSource`]) and the Kubernetes API
//! ([`KubeSource`]). Either also gives this node's addresses (the NodePort
//! frontends and the SNAT address, [`crate::source::node`]): the Node's
//! addresses, or those of the `--external` interfaces. The health-check
//! node ports of the translated Services are served alongside
//! ([`HealthCheckServer`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lb_common::config::DatapathConfig;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, Interval};
use tracing::{debug, error, info, warn};

use crate::datapath::loader::{
    Capacities, Datapath, LoadError, LoadOptions, XdpForwardChoice, XdpForwarding,
    choose_xdp_forwarding, xdp_mode_name,
};
use crate::datapath::maps::{AyaMaps, StatsMaps};
use crate::datapath::writer::{ApplyReport, MapReadError, Writer};
use crate::health_check::HealthCheckServer;
use crate::http::{HealthServer, HttpError, Readiness};
use crate::metrics::{Metrics, ProgrammedIds};
use crate::model::DesiredState;
use crate::model::Selection;
use crate::source::kube::{self as kube_source, KubeError, KubeOptions, KubeSource};
use crate::source::manifests::{DirWatcher, ManifestSource, SourceError};
use crate::source::node::{self, NodeAddresses};
use crate::translate::{Notice, NoticeLevel, Scope, Translation};

/// Rescan the directory this often even without an event, in case one was
/// lost (the directory replaced, say). Unchanged files cost a read.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// First retry of a failed map write; doubled up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
pub const MAX_RETRY: Duration = Duration::from_secs(30);
/// How often `--attach-veths` looks for new and vanished veths.
pub const VETH_SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How often the manifest source reads the `--external` interfaces'
/// addresses again (the Kubernetes source follows the Node instead).
pub const ADDRESS_SCAN_INTERVAL: Duration = Duration::from_secs(5);

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceOptions {
    /// A directory of manifests, watched.
    Manifests(PathBuf),
    /// The Kubernetes API.
    Kube(KubeOptions),
}

/// Options of `lb-agent run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: SourceOptions,
    /// The node name and service proxy name translation works for.
    pub scope: Scope,
    pub attach: Vec<String>,
    /// Also attach to every veth of the network namespace, following pods
    /// as they come and go (but the `external` ones).
    pub attach_veths: bool,
    /// The node's interfaces to its network, for `lb_xdp_ext` and
    /// `lb_tc_ext`; with manifests, their addresses are the node's.
    pub external: Vec<String>,
    /// How `lb_xdp_ext` forwards on the `external` interfaces: `XDP_TX`,
    /// through `lb_tc_ext`, or chosen by their drivers.
    pub xdp_forward: XdpForwardChoice,
    pub pin_dir: PathBuf,
    pub keep_pins: bool,
    pub capacities: Capacities,
    /// Written to `LB_CONFIG`; `CONFIG_F_LOG` set with `--datapath-log`.
    /// Its `snat_addr` is replaced by the node's SNAT address as found.
    pub config: DatapathConfig,
    /// Forward the datapath's aya-log records to the agent's log.
    pub datapath_log: bool,
    /// Backend selection of Services without the `lb.dev/selection` annotation.
    pub selection: Selection,
    /// Serve `/healthz`, `/readyz` and `/metrics` here.
    pub health_addr: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the manifest directory {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("reading the datapath maps at start")]
    ReadMaps(#[from] MapReadError),
    #[error("installing the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("polling the datapath log")]
    DatapathLog(#[source] std::io::Error),
    #[error("--external {0}: no such interface in this network namespace")]
    NoExternalInterface(String),
    #[error("listing the interfaces of this network namespace")]
    ListInterfaces(#[source] std::io::Error),
    #[error(
        "{0} is named by both --attach and --external: a pod-facing interface or the node's network, not both"
    )]
    AttachAndExternal(String),
}

/// Checks the `--external` interfaces before anything is loaded: each must
/// exist in this network namespace, and none be a pod interface as well.
fn check_external(options: &RunOptions) -> Result<(), AgentError> {
    if options.external.is_empty() {
        return Ok(());
    }
    let interfaces = crate::veths::interfaces().map_err(AgentError::ListInterfaces)?;
    for iface in &options.external {
        if options.attach.contains(iface) {
            return Err(AgentError::AttachAndExternal(iface.clone()));
        }
        if !interfaces.contains_key(iface) {
            return Err(AgentError::NoExternalInterface(iface.clone()));
        }
    }
    Ok(())
}

/// How `lb_xdp_ext` forwards on this agent's external interfaces, logged
/// with the reason (see [`choose_xdp_forwarding`]). `None` without
/// external interfaces (XDP is not attached anywhere).
fn decide_xdp_forwarding(options: &RunOptions) -> Option<XdpForwarding> {
    if options.external.is_empty() {
        return None;
    }
    let drivers: Vec<(String, Result<String, String>)> = match options.xdp_forward {
        // The drivers matter only to the automatic choice.
        XdpForwardChoice::Fixed(_) => Vec::new(),
        XdpForwardChoice::Auto => options
            .external
            .iter()
            .map(|iface| {
                let driver =
                    crate::veths::interface_driver(iface).map_err(|error| error.to_string());
                if let Err(error) = &driver {
                    warn!(
                        iface = iface.as_str(),
                        "reading the driver of {iface} (ETHTOOL_GDRVINFO): {error}; \
                         taken as not a veth"
                    );
                }
                (iface.clone(), driver)
            })
            .collect(),
    };
    let decision = choose_xdp_forwarding(options.xdp_forward, &drivers);
    info!(
        xdp_forward = decision.forwarding.name(),
        "XDP forwarding {}: {}, because {}",
        decision.forwarding.name(),
        match decision.forwarding {
            XdpForwarding::Transmit => {
                "XDP_TX where the route leads back out of the arrival interface, the rest through lb_tc_ext"
            }
            XdpForwarding::Tc => "every packet to forward goes to lb_tc_ext (bpf_redirect_neigh)",
        },
        decision.reason
    );
    Some(decision.forwarding)
}

/// The source, ready to be read.
enum Source {
    Manifests {
        source: ManifestSource,
        dir: PathBuf,
        watcher: DirWatcher,
        resync: Interval,
        /// The interfaces whose addresses are the node's.
        external: Vec<String>,
    },
    Kube(KubeSource),
}

impl Source {
    /// Waits until the source may have changed.
    async fn changed(&mut self) {
        match self {
            Source::Manifests {
                dir,
                watcher,
                resync,
                ..
            } => {
                tokio::select! {
                    change = watcher.changed() => {
                        if change.is_none() || watcher.is_stale() {
                            renew_watcher(watcher, dir);
                        }
                    }
                    _ = resync.tick() => {
                        if watcher.is_stale() {
                            renew_watcher(watcher, dir);
                        }
                    }
                }
            }
            Source::Kube(source) => source.changed().await,
        }
    }

    /// Reads the source again; whether anything may have changed.
    fn refresh(&mut self) -> bool {
        match self {
            Source::Manifests { source, .. } => match source.scan() {
                Ok(outcome) => outcome.changed,
                Err(error) => {
                    error!("{}; keeping the programmed state", error_chain(&error));
                    false
                }
            },
            // The reflectors keep the stores current; a wake-up is a change.
            Source::Kube(_) => true,
        }
    }

    /// This node's addresses now: the Node's, or the external interfaces'.
    fn node_addresses(&self) -> std::io::Result<NodeAddresses> {
        match self {
            Source::Manifests { external, .. } => node::read_interfaces(external),
            Source::Kube(source) => Ok(source.node_addresses()),
        }
    }

    fn translate(&self, scope: &Scope) -> Translation {
        match self {
            Source::Manifests { source, .. } => source.translate_in(scope),
            Source::Kube(source) => source.translate(scope),
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(options: RunOptions) -> Result<(), AgentError> {
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| AgentError::Signal("SIGINT", e))?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| AgentError::Signal("SIGTERM", e))?;
    let stop = async move {
        tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        }
    };

    check_external(&options)?;
    let xdp_forwarding = decide_xdp_forwarding(&options);
    let metrics = Arc::new(Metrics::new());
    metrics.set_capacities(&options.capacities);
    let readiness = Arc::new(Readiness::default());
    let source = match &options.source {
        SourceOptions::Manifests(dir) => {
            if !dir.is_dir() {
                return Err(AgentError::NotADirectory(dir.clone()));
            }
            // Watch before the first scan, so no change falls between the two.
            let watcher = DirWatcher::new(dir)?;
            Source::Manifests {
                source: ManifestSource::new(dir),
                dir: dir.clone(),
                watcher,
                resync: tokio::time::interval_at(Instant::now() + RESYNC_INTERVAL, RESYNC_INTERVAL),
                external: options.external.clone(),
            }
        }
        SourceOptions::Kube(kube) => {
            let config = kube_source::client_config(kube).await?;
            info!(
                api = %config.cluster_url,
                node = options.scope.node_name.as_deref().unwrap_or("<none>"),
                service_proxy_name = options.scope.service_proxy_name.as_deref().unwrap_or("<none>"),
                "watching the Kubernetes API"
            );
            if options.scope.node_name.is_none() && !options.external.is_empty() {
                warn!(
                    "no --node-name (NODE_NAME): this node's addresses are unknown, so \
                     NodePorts get no frontend and external flows to other nodes are dropped"
                );
            }
            Source::Kube(KubeSource::start(
                config,
                &options.scope,
                Arc::clone(&metrics) as Arc<dyn kube_source::WatchObserver>,
            )?)
        }
    };

    // After the source, so a configuration error stops the agent before it
    // binds anything.
    let health_task = match options.health_addr {
        Some(addr) => {
            let server =
                HealthServer::bind(addr, Arc::clone(&readiness), Arc::clone(&metrics)).await?;
            info!(addr = %addr, "serving /healthz, /readyz and /metrics");
            Some(tokio::spawn(server.serve()))
        }
        None => None,
    };

    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: options.pin_dir.clone(),
        capacities: options.capacities,
        config: options.config,
    })?;
    // Before anything is attached; the shutdown below undoes the load on
    // failure as after any other error.
    let configured = match xdp_forwarding {
        Some(forwarding) => datapath.set_xdp_forwarding(forwarding).map(drop),
        None => Ok(()),
    };
    let result = match configured {
        Ok(()) => {
            serve(
                &options,
                &mut datapath,
                source,
                Shared { metrics, readiness },
                stop,
            )
            .await
        }
        Err(error) => Err(error.into()),
    };
    if let Some(task) = health_task {
        task.abort();
    }
    // Undo even after an error; the caller reports the error itself.
    let shutdown = datapath.shutdown(options.keep_pins);
    result?;
    shutdown?;
    Ok(())
}

/// What the run loop shares with the HTTP endpoint.
struct Shared {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// `error: cause: cause`, for one log line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// Logs the notices that were not there last time.
fn log_new_notices(previous: &mut BTreeSet<Notice>, notices: Vec<Notice>) {
    let current: BTreeSet<Notice> = notices.into_iter().collect();
    for notice in current.difference(previous) {
        match notice.level {
            NoticeLevel::Warn => warn!("{}: {}", notice.object, notice.message),
            NoticeLevel::Debug => debug!("{}: {}", notice.object, notice.message),
        }
    }
    *previous = current;
}

/// The state of the run loop between events.
struct Applier {
    source: Source,
    scope: Scope,
    writer: Writer<AyaMaps>,
    metrics: Arc<Metrics>,
    notices: BTreeSet<Notice>,
    /// When to apply again after failed map writes, and the next delay.
    retry: Option<(Instant, Duration)>,
    /// The last state written without a failure, and what that left in the
    /// maps: an equal translation needs no write at all (an event about an
    /// object that changes nothing the datapath sees, a relist).
    last_written: Option<(DesiredState, ApplyReport)>,
    /// This node's addresses as last read from the source (`None` before
    /// the first read).
    node_addresses: Option<NodeAddresses>,
    /// Whether a missing SNAT address matters (there are external
    /// interfaces) and so deserves a warning.
    warn_without_snat: bool,
    /// The health-check node ports of the translated Services.
    health_checks: HealthCheckServer,
}

impl Applier {
    /// Reads this node's addresses from the source again; whether they
    /// changed (the caller then writes the SNAT address and translates).
    fn refresh_node_addresses(&mut self) -> bool {
        let addresses = match self.source.node_addresses() {
            Ok(addresses) => addresses,
            Err(error) => {
                warn!(
                    "reading this node's addresses: {error}; keeping {:?}",
                    self.scope.node_addresses
                );
                return false;
            }
        };
        if self.node_addresses.as_ref() == Some(&addresses) {
            return false;
        }
        info!(
            addresses = ?addresses.addresses,
            snat = %addresses.snat_or_unspecified(),
            "node addresses: {:?}, SNAT address {}",
            addresses.addresses,
            addresses.snat_or_unspecified()
        );
        if addresses.snat.is_none() && self.warn_without_snat {
            warn!(
                "no SNAT address for this node (no InternalIP on its Node, or no IPv4 address on \
                 the first --external interface): external flows to backends on other nodes are dropped"
            );
        }
        self.scope.node_addresses = addresses.addresses.clone();
        self.node_addresses = Some(addresses);
        true
    }

    /// Reads the source again; applies if anything changed (or `force`).
    fn rescan(&mut self, force: bool) -> Option<ApplyReport> {
        let changed = self.source.refresh();
        (changed || force).then(|| self.apply())
    }

    fn apply(&mut self) -> ApplyReport {
        let started = std::time::Instant::now();
        let translation = self.source.translate(&self.scope);
        let translated = started.elapsed();
        log_new_notices(&mut self.notices, translation.notices);
        // Whether or not the maps need a write: a count may change alone.
        self.health_checks.update(translation.state.health_checks());
        let report = match &self.last_written {
            Some((state, report)) if *state == translation.state => ApplyReport {
                writes: 0,
                failures: 0,
                ..*report
            },
            _ => {
                let report = self.writer.apply(&translation.state);
                self.last_written = (report.failures == 0).then_some((translation.state, report));
                // Ids are handed out and released only by map writes
                // (attempted ones included).
                if report.writes > 0 || report.failures > 0 {
                    self.metrics
                        .set_programmed_ids(ProgrammedIds::of(&self.writer));
                }
                report
            }
        };
        debug!(
            translate_ms = translated.as_secs_f64() * 1000.0,
            write_ms = (started.elapsed() - translated).as_secs_f64() * 1000.0,
            "sync timing"
        );
        self.metrics
            .record_sync(&report, self.writer.programmed(), started.elapsed());
        if let Source::Kube(source) = &mut self.source {
            let now = jiff::Timestamp::now();
            for trigger in source.new_trigger_times() {
                let latency = now.duration_since(trigger);
                if let Ok(latency) = Duration::try_from(latency) {
                    self.metrics.observe_programming(latency);
                }
            }
        }
        self.retry = if report.failures == 0 {
            None
        } else {
            let delay = self
                .retry
                .map_or(FIRST_RETRY, |(_, delay)| (delay * 2).min(MAX_RETRY));
            warn!(
                failures = report.failures,
                total_map_errors = self.writer.map_errors(),
                "{} map writes failed; retrying in {delay:?}",
                report.failures
            );
            Some((Instant::now() + delay, delay))
        };
        report
    }
}

/// Watches the manifest directory anew (it was removed or replaced); if it
/// cannot be watched yet, the old watcher stays and the periodic rescan
/// tries again.
fn renew_watcher(watcher: &mut DirWatcher, dir: &std::path::Path) {
    match DirWatcher::new(dir) {
        Ok(renewed) => {
            info!(dir = %dir.display(), "the manifest directory was replaced; watching the new one");
            *watcher = renewed;
        }
        Err(error) => warn!(
            "{}; rescanning every {RESYNC_INTERVAL:?}",
            error_chain(&error)
        ),
    }
}

/// What woke the run loop.
enum Wakeup {
    Stop(&'static str),
    Changed,
    Retry,
    ScanVeths,
    ScanAddresses,
}

/// Reads this node's addresses again and keeps `LB_CONFIG.snat_addr` equal
/// to its SNAT address (rewritten only when it differs, so a failed write
/// is tried again next time). Whether the addresses changed.
fn sync_node_addresses(applier: &mut Applier, datapath: &mut Datapath) -> bool {
    let changed = applier.refresh_node_addresses();
    let snat = applier
        .node_addresses
        .as_ref()
        .map_or(Ipv4Addr::UNSPECIFIED, NodeAddresses::snat_or_unspecified);
    match datapath.set_snat_addr(snat) {
        Ok(true) => info!(snat = %snat, "SNAT address {snat} written to LB_CONFIG"),
        Ok(false) => {}
        Err(error) => error!(
            "{}; the datapath keeps SNAT address {}",
            error_chain(&error),
            Ipv4Addr::from(u32::from_be(datapath.config().snat_addr))
        ),
    }
    changed
}

/// Attaches to the veths that appeared since the last call and detaches
/// from those that went (a pod deleted; or replaced: same name, new
/// ifindex). `attached` holds the veths attached this way, with their
/// ifindex; `explicit` are the `--attach` and `--external` interfaces, left
/// alone (a node's own link to its network can be a veth too).
fn follow_veths(
    datapath: &mut Datapath,
    attached: &mut BTreeMap<String, u32>,
    explicit: &[String],
) {
    let current = match crate::veths::veths() {
        Ok(current) => current,
        Err(error) => {
            warn!("listing veths: {error}; trying again in {VETH_SCAN_INTERVAL:?}");
            return;
        }
    };
    let gone: Vec<String> = attached
        .iter()
        .filter(|(name, index)| current.get(*name) != Some(index))
        .map(|(name, _)| name.clone())
        .collect();
    for name in gone {
        attached.remove(&name);
        match datapath.detach(&name) {
            Ok(()) => info!(iface = name.as_str(), "veth gone"),
            Err(error) => debug!(
                iface = name.as_str(),
                "veth gone; releasing its link: {}",
                error_chain(&error)
            ),
        }
    }
    for (name, index) in current {
        if attached.contains_key(&name) || explicit.contains(&name) {
            continue;
        }
        match datapath.attach(&name) {
            Ok(()) => {
                attached.insert(name, index);
            }
            Err(error) => warn!(
                iface = name.as_str(),
                "{}; trying again in {VETH_SCAN_INTERVAL:?}",
                error_chain(&error)
            ),
        }
    }
}

async fn serve(
    options: &RunOptions,
    datapath: &mut Datapath,
    source: Source,
    shared: Shared,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<(), AgentError> {
    let log_task = if options.datapath_log {
        let logger = datapath.start_logger()?;
        // SAFETY: the logger owns its ring buffer's fd and never closes or
        // replaces it while it lives; flushing only reads from it.
        let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
            .map_err(|error| AgentError::DatapathLog(error.into()))?;
        Some(tokio::spawn(async move {
            loop {
                match logger.readable_mut().await {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(error) => {
                        error!("datapath log stopped: {error}");
                        break;
                    }
                }
            }
        }))
    } else {
        None
    };
    let result = run_loop(options, datapath, source, shared, stop).await;
    if let Some(task) = log_task {
        task.abort();
    }
    result
}

async fn run_loop(
    options: &RunOptions,
    datapath: &mut Datapath,
    source: Source,
    shared: Shared,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<(), AgentError> {
    tokio::pin!(stop);
    // The first programming waits for the complete initial lists, so a
    // starting agent never programs half of a Service.
    if let Source::Kube(kube) = &source {
        tokio::select! {
            reason = &mut stop => {
                info!("{reason} received before the initial lists completed: shutting down");
                return Ok(());
            }
            synced = kube.wait_synced() => synced?,
        }
    }

    if !options.external.is_empty() {
        // Before the first write: a missing or rejected program stops the
        // start before anything is programmed or attached.
        datapath.load_external()?;
    }
    let maps = datapath.take_maps()?;
    shared
        .metrics
        .set_stats_reader(StatsMaps::from_pins(datapath.pin_dir()).map_err(LoadError::Maps)?);
    let mut writer = if datapath.reused_pins().is_empty() {
        Writer::new(maps)
    } else {
        Writer::adopt(maps)?
    };
    writer.set_selection(options.selection, datapath.maglev_table_size());
    let mut applier = Applier {
        source,
        scope: options.scope.clone(),
        writer,
        metrics: shared.metrics,
        notices: BTreeSet::new(),
        retry: None,
        last_written: None,
        node_addresses: None,
        warn_without_snat: !options.external.is_empty(),
        health_checks: HealthCheckServer::default(),
    };
    // Program the maps before attaching, so the first packet already sees
    // every service.
    let started = std::time::Instant::now();
    sync_node_addresses(&mut applier, datapath);
    let report = applier.rescan(true).unwrap_or_default();
    let programmed_in = started.elapsed();
    for iface in &options.attach {
        datapath.attach(iface)?;
    }
    for iface in &options.external {
        datapath.attach_external(iface)?;
    }
    let not_pods: Vec<String> = options
        .attach
        .iter()
        .chain(&options.external)
        .cloned()
        .collect();
    let mut veths = BTreeMap::new();
    if options.attach_veths {
        follow_veths(datapath, &mut veths, &not_pods);
    }
    shared.readiness.set_ready();
    info!(
        frontends = report.frontends,
        service_ports = report.service_ports,
        backends = report.backends,
        writes = report.writes,
        programmed_in_ms = programmed_in.as_secs_f64() * 1000.0,
        "programmed {} services ({} frontends), {} backends in {programmed_in:.1?}; attached to {}{}",
        report.service_ports,
        report.frontends,
        report.backends,
        {
            let ifaces: Vec<&str> = datapath.attached().collect();
            if ifaces.is_empty() {
                "no pod interface yet".to_owned()
            } else {
                ifaces.join(", ")
            }
        },
        {
            let external: Vec<String> = datapath
                .external()
                .map(|(iface, mode)| format!("{iface} ({} XDP)", xdp_mode_name(mode)))
                .collect();
            if external.is_empty() {
                String::new()
            } else {
                format!(
                    "; external: {}, XDP forwarding {}",
                    external.join(", "),
                    datapath.xdp_forwarding().name()
                )
            }
        }
    );

    let mut veth_scan =
        tokio::time::interval_at(Instant::now() + VETH_SCAN_INTERVAL, VETH_SCAN_INTERVAL);
    // The Kubernetes source follows the Node; manifests have only the
    // interfaces to read, now and then.
    let scan_addresses =
        matches!(applier.source, Source::Manifests { .. }) && !options.external.is_empty();
    let mut address_scan = tokio::time::interval_at(
        Instant::now() + ADDRESS_SCAN_INTERVAL,
        ADDRESS_SCAN_INTERVAL,
    );

    let reason = loop {
        let retry_at = applier.retry.map(|(at, _)| at);
        let wakeup = tokio::select! {
            reason = &mut stop => Wakeup::Stop(reason),
            () = applier.source.changed() => Wakeup::Changed,
            () = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => Wakeup::Retry,
            _ = veth_scan.tick(), if options.attach_veths => Wakeup::ScanVeths,
            _ = address_scan.tick(), if scan_addresses => Wakeup::ScanAddresses,
        };
        let report = match wakeup {
            Wakeup::Stop(reason) => break reason,
            Wakeup::Changed => {
                // A Node change wakes the Kubernetes source like any other.
                let addresses_changed = sync_node_addresses(&mut applier, datapath);
                applier.rescan(addresses_changed)
            }
            Wakeup::Retry => Some(applier.apply()),
            Wakeup::ScanVeths => {
                follow_veths(datapath, &mut veths, &not_pods);
                None
            }
            Wakeup::ScanAddresses => {
                sync_node_addresses(&mut applier, datapath).then(|| applier.apply())
            }
        };
        if let Some(report) = report
            && (report.writes > 0 || report.failures > 0)
        {
            info!(
                frontends = report.frontends,
                service_ports = report.service_ports,
                backends = report.backends,
                writes = report.writes,
                failures = report.failures,
                "programmed change ({} map writes): {} services ({} frontends), {} backends",
                report.writes,
                report.service_ports,
                report.frontends,
                report.backends
            );
        }
    };
    info!("{reason} received: shutting down");
    Ok(())
}
