//! The balancer's event log, live: the XDP program's aya-log records (one per drop, PMTU reply
//! and conntrack eviction, written only while [`Dataplane::set_event_log`] has it on) to
//! whoever watches (`lb trace --live`).
//!
//! The path of a record: the program writes it to its aya-log ring buffer; [`EventLogger::pump`]
//! reads it and hands it to the `log` facade (target [`LOG_TARGET`], level debug); the `log`
//! bridge of `tracing-subscriber` turns it into a `tracing` event; [`layer`] copies every event
//! of that target, whatever its level, as one line into a broadcast channel, which
//! [`subscribe`] hands out. The normal log (the fmt layer) keeps its own filter: at the default
//! `info` the records do not appear there; `--log-level info,lb_balancer=debug` shows them too.
//!
//! Wiring in the daemon (tokio):
//! ```ignore
//! // At start-up, after Dataplane::load: pump the records as they come.
//! let logger = dp.take_event_logger().expect("taken once");
//! let mut fd = tokio::io::unix::AsyncFd::with_interest(logger, tokio::io::Interest::READABLE)?;
//! tokio::spawn(async move {
//!     while let Ok(mut ready) = fd.readable_mut().await {
//!         ready.get_inner_mut().pump();
//!         ready.clear_ready();
//!     }
//! });
//! // In the loop that owns the Dataplane: the switch follows the watchers.
//! let mut watchers = livelog::watch_subscribers();
//! // select! arm:
//! _ = watchers.changed() => {
//!     let on = *watchers.borrow_and_update() > 0;
//!     dp.set_event_log(on)?;
//! }
//! // In the API handler of `lb trace --live`: one subscription per client, dropped when the
//! // client goes (which is what turns the switch off after the last one).
//! let mut sub = livelog::subscribe();
//! loop {
//!     match sub.recv().await {
//!         Ok(line) => send(line).await?,
//!         Err(broadcast::error::RecvError::Lagged(n)) => send(format!("({n} records lost)")).await?,
//!         Err(broadcast::error::RecvError::Closed) => break,
//!     }
//! }
//! ```
use std::{
    fmt::Write as _,
    ops::{Deref, DerefMut},
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    sync::{
        Arc, LazyLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use aya::Ebpf;
use aya_log::EbpfLogger;
pub use lb_common::LOG_TARGET;
use tokio::sync::{broadcast, watch};
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{Filtered, LevelFilter, Targets},
    layer::{Context, SubscriberExt as _},
    util::SubscriberInitExt as _,
};

/// Lines a subscriber may fall behind by before it loses the oldest (it then gets
/// `RecvError::Lagged` with the number lost).
pub const CAPACITY: usize = 4096;

struct Hub {
    lines: broadcast::Sender<String>,
    subscribers: watch::Sender<usize>,
}

static HUB: LazyLock<Hub> = LazyLock::new(|| Hub {
    lines: broadcast::channel(CAPACITY).0,
    subscribers: watch::channel(0).0,
});

/// A watcher of the live event log: receives every record's line from now on. Dropping it
/// counts the watcher out ([`watch_subscribers`]).
pub struct Subscription {
    rx: broadcast::Receiver<String>,
}

impl Deref for Subscription {
    type Target = broadcast::Receiver<String>;
    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl DerefMut for Subscription {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rx
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        HUB.subscribers.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Starts watching the live event log.
pub fn subscribe() -> Subscription {
    let rx = HUB.lines.subscribe();
    HUB.subscribers.send_modify(|n| *n += 1);
    Subscription { rx }
}

/// Watchers now.
pub fn subscribers() -> usize {
    *HUB.subscribers.borrow()
}

/// The number of watchers, changing as they come and go: the daemon keeps the program's event
/// log on while it is above zero.
pub fn watch_subscribers() -> watch::Receiver<usize> {
    HUB.subscribers.subscribe()
}

/// The layer that feeds [`subscribe`]: every event whose target is [`LOG_TARGET`], at any
/// level and whatever the other layers' filters, as one line (the record's message, then any
/// other fields as ` name=value`).
pub fn layer<S>() -> Filtered<LiveLog, Targets, S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    LiveLog.with_filter(Targets::new().with_target(LOG_TARGET, LevelFilter::TRACE))
}

/// Logging for the `lb` binary: the normal log to stderr under `filter`, and [`layer`] beside
/// it (so the live event log works at any log level). Also bridges `log` records (aya's and the
/// program's) into `tracing`.
pub fn try_init(filter: EnvFilter) -> Result<(), String> {
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only for a person at a terminal; logs collected by systemd or a
                // test are plain.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter),
        )
        .with(layer())
        .try_init()
        .map_err(|e| e.to_string())
}

/// See [`layer`].
pub struct LiveLog;

impl<S: Subscriber> Layer<S> for LiveLog {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        // Sending costs a formatted line; nobody watching, nothing to do.
        if HUB.lines.receiver_count() == 0 {
            return;
        }
        let mut line = Line::default();
        event.record(&mut line);
        // Fails only when the last watcher left meanwhile.
        let _ = HUB.lines.send(line.into_string());
    }
}

/// One event as a line: the message first, then other fields. The `log.*` fields the `log`
/// bridge adds (target, module, file, line) are left out.
#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Line {
    fn into_string(self) -> String {
        if self.fields.is_empty() {
            self.message
        } else if self.message.is_empty() {
            self.fields.trim_start().to_string()
        } else {
            self.message + &self.fields
        }
    }
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            n if n.starts_with("log.") => {}
            n => {
                let _ = write!(self.fields, " {n}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            n if n.starts_with("log.") => {}
            n => {
                let _ = write!(self.fields, " {n}={value:?}");
            }
        }
    }
}

/// Reader of the program's event records (its aya-log ring buffer). The fd turns readable when
/// records wait (register it with `tokio::io::unix::AsyncFd`); [`EventLogger::pump`] reads
/// them all and hands them to the `log` facade.
pub struct EventLogger {
    inner: EbpfLogger<ToLog>,
    records: Arc<AtomicUsize>,
}

impl EventLogger {
    /// Takes the program's `AYA_LOGS` map out of `ebpf`. Must happen before the program loads,
    /// and the map must stay open until it has (this object holds it).
    pub(crate) fn new(ebpf: &mut Ebpf) -> Result<Self, aya_log::Error> {
        let records = Arc::new(AtomicUsize::new(0));
        let inner = EbpfLogger::init_with_logger(
            ebpf,
            ToLog {
                records: records.clone(),
            },
        )?;
        Ok(Self { inner, records })
    }

    /// Hands every waiting record to the `log` facade (target [`LOG_TARGET`], level debug);
    /// returns how many there were. Never blocks.
    pub fn pump(&mut self) -> usize {
        let before = self.records.load(Ordering::Relaxed);
        self.inner.flush();
        self.records.load(Ordering::Relaxed).wrapping_sub(before)
    }
}

impl AsFd for EventLogger {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsRawFd for EventLogger {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

/// aya-log's sink: the `log` facade's logger as it is when a record arrives (so records pumped
/// before logging is set up are not tied to a no-op logger), counting the records.
struct ToLog {
    records: Arc<AtomicUsize>,
}

impl log::Log for ToLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        self.records.fetch_add(1, Ordering::Relaxed);
        log::logger().log(record);
    }

    // aya-log flushes after every record; the `tracing` bridge has nothing to flush.
    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn the_logger_can_move_into_a_task() {
        assert_send::<EventLogger>();
        assert_send::<Subscription>();
    }

    /// Through the real path from `log` on: a record of the program's target reaches a
    /// watcher even though the normal log's filter is `off`; other targets do not.
    #[test]
    fn records_of_the_target_reach_watchers_and_are_counted() {
        // One global subscriber per process: this is the only test that installs it.
        try_init(EnvFilter::new("off")).expect("first init");
        assert_eq!(subscribers(), 0);
        let mut watchers = watch_subscribers();
        let mut sub = subscribe();
        assert_eq!(subscribers(), 1);
        assert!(watchers.has_changed().expect("hub alive"));
        assert_eq!(*watchers.borrow_and_update(), 1);
        let sink = ToLog {
            records: Arc::new(AtomicUsize::new(0)),
        };
        for (target, msg) in [(LOG_TARGET, "drop NoBackend"), ("other", "not this")] {
            log::Log::log(
                &sink,
                &log::Record::builder()
                    .target(target)
                    .level(log::Level::Debug)
                    .args(format_args!("{msg}"))
                    .build(),
            );
        }
        assert_eq!(sink.records.load(Ordering::Relaxed), 2);
        assert_eq!(sub.try_recv().expect("one line"), "drop NoBackend");
        assert!(sub.try_recv().is_err(), "only the program's target");
        tracing::info!(target: "lb_balancer", vip = 3, "by tracing");
        assert_eq!(sub.try_recv().expect("one line"), "by tracing vip=3");
        drop(sub);
        assert_eq!(subscribers(), 0);
        assert_eq!(*watchers.borrow_and_update(), 0);
    }
}
