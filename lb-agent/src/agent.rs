//! `lb-agent run`: load the datapath, program the initial state, attach,
//! then apply every change of the source until SIGINT/SIGTERM, and undo it
//! all on the way out.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use lb_common::config::DatapathConfig;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::datapath::loader::{Capacities, Datapath, LoadError, LoadOptions};
use crate::datapath::maps::AyaMaps;
use crate::datapath::writer::{ApplyReport, MapReadError, Writer};
use crate::model::Selection;
use crate::source::manifests::{DirWatcher, ManifestSource, SourceError};
use crate::translate::{Notice, NoticeLevel};

/// Rescan the directory this often even without an event, in case one was
/// lost (the directory replaced, say). Unchanged files cost a read.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// First retry of a failed map write; doubled up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
pub const MAX_RETRY: Duration = Duration::from_secs(30);

/// Options of `lb-agent run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub manifests: PathBuf,
    pub attach: Vec<String>,
    pub pin_dir: PathBuf,
    pub keep_pins: bool,
    pub capacities: Capacities,
    /// Written to `LB_CONFIG`; `CONFIG_F_LOG` set with `--datapath-log`.
    pub config: DatapathConfig,
    /// Forward the datapath's aya-log records to the agent's log.
    pub datapath_log: bool,
    /// Backend selection of Services without the `lb.dev/selection` annotation.
    pub selection: Selection,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the manifest directory {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("reading the datapath maps at start")]
    ReadMaps(#[from] MapReadError),
    #[error("installing the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("polling the datapath log")]
    DatapathLog(#[source] std::io::Error),
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(options: RunOptions) -> Result<(), AgentError> {
    if !options.manifests.is_dir() {
        return Err(AgentError::NotADirectory(options.manifests.clone()));
    }
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| AgentError::Signal("SIGINT", e))?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| AgentError::Signal("SIGTERM", e))?;
    // Watch before the first scan, so no change falls between the two.
    let watcher = DirWatcher::new(&options.manifests)?;

    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: options.pin_dir.clone(),
        capacities: options.capacities,
        config: options.config,
    })?;
    let result = serve(&options, &mut datapath, watcher, async move {
        tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        }
    })
    .await;
    // Undo even after an error; the caller reports the error itself.
    let shutdown = datapath.shutdown(options.keep_pins);
    result?;
    shutdown?;
    Ok(())
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
    source: ManifestSource,
    writer: Writer<AyaMaps>,
    notices: BTreeSet<Notice>,
    /// When to apply again after failed map writes, and the next delay.
    retry: Option<(Instant, Duration)>,
}

impl Applier {
    /// Rescans the source; applies if anything changed (or `force`).
    fn rescan(&mut self, force: bool) -> Option<ApplyReport> {
        let changed = match self.source.scan() {
            Ok(outcome) => outcome.changed,
            Err(error) => {
                error!("{}; keeping the programmed state", error_chain(&error));
                false
            }
        };
        (changed || force).then(|| self.apply())
    }

    fn apply(&mut self) -> ApplyReport {
        let translation = self.source.translate();
        log_new_notices(&mut self.notices, translation.notices);
        let report = self.writer.apply(&translation.state);
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

async fn serve(
    options: &RunOptions,
    datapath: &mut Datapath,
    mut watcher: DirWatcher,
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

    let maps = datapath.take_maps()?;
    let mut writer = if datapath.reused_pins().is_empty() {
        Writer::new(maps)
    } else {
        Writer::adopt(maps)?
    };
    writer.set_selection(options.selection, datapath.maglev_table_size());
    let mut applier = Applier {
        source: ManifestSource::new(&options.manifests),
        writer,
        notices: BTreeSet::new(),
        retry: None,
    };
    // Program the maps before attaching, so the first packet already sees
    // every service.
    let report = applier.rescan(true).unwrap_or_default();
    for iface in &options.attach {
        datapath.attach(iface)?;
    }
    info!(
        frontends = report.frontends,
        service_ports = report.service_ports,
        backends = report.backends,
        writes = report.writes,
        "programmed {} services ({} frontends), {} backends; attached to {}",
        report.service_ports,
        report.frontends,
        report.backends,
        options.attach.join(", ")
    );

    let mut resync = tokio::time::interval_at(Instant::now() + RESYNC_INTERVAL, RESYNC_INTERVAL);
    tokio::pin!(stop);
    let reason = loop {
        let retry_at = applier.retry.map(|(at, _)| at);
        let report = tokio::select! {
            reason = &mut stop => break reason,
            change = watcher.changed() => {
                if change.is_none() || watcher.is_stale() {
                    renew_watcher(&mut watcher, &options.manifests);
                }
                applier.rescan(false)
            }
            _ = resync.tick() => {
                if watcher.is_stale() {
                    renew_watcher(&mut watcher, &options.manifests);
                }
                applier.rescan(false)
            }
            () = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => Some(applier.apply()),
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
    if let Some(task) = log_task {
        task.abort();
    }
    Ok(())
}
