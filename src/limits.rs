//! Connection caps for the TCP listeners (HTTPS, TURN over TCP and TLS): at most so
//! many connections in total and from one source address. A connection holds a
//! [`ConnPermit`] for its whole life; a refused one is closed at once, counted, and
//! logged at most once per [`LOG_EVERY`] per listener, naming the key to raise.
//! Accept errors (out of file descriptors above all) are reported the same way by
//! [`AcceptBackoff`], which also paces the accept loop so it never spins, and which
//! keeps one spare descriptor per listener: out of descriptors, it gives the spare up
//! for a moment to accept waiting connections and close them at once, so their
//! clients learn at once instead of waiting in the kernel's backlog.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The shortest interval between two log lines about the same limit.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

/// `meshmeet_<listener>_connections_open` and `..._connections_refused_total`.
#[derive(Clone, Default)]
pub struct LimitMetrics {
    open: Gauge,
    refused: Family<RefusalLabels, Counter>,
}

impl LimitMetrics {
    /// Registers the metrics of `listener` (`https`, `turn_stream`).
    pub fn register(registry: &mut Registry, listener: &str) -> LimitMetrics {
        let m = LimitMetrics::default();
        registry.register(
            format!("meshmeet_{listener}_connections_open"),
            "Connections currently open",
            m.open.clone(),
        );
        registry.register(
            format!("meshmeet_{listener}_connections_refused"),
            "Connections refused: a connection cap (total, per_ip), closed at once at the \
             file-descriptor limit (fd_limit), or accept errors (accept_error)",
            m.refused.clone(),
        );
        m
    }

    fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerIp,
}

/// Settings of one listener's caps, and the configuration keys that set them (for
/// the log line).
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub total: usize,
    pub per_ip: usize,
    pub total_key: &'static str,
    pub per_ip_key: &'static str,
}

struct Counts {
    total: usize,
    /// The most connections open since memory was last given back.
    peak: usize,
    per_ip: HashMap<IpAddr, usize>,
    last_log: Option<Instant>,
}

/// The caps of one listener, shared by its accept loop and its connections.
pub struct ConnLimiter {
    what: &'static str,
    caps: Caps,
    counts: Mutex<Counts>,
    metrics: LimitMetrics,
}

impl ConnLimiter {
    /// `what` names the listener in log lines ("HTTPS", "TURN over TCP/TLS").
    pub fn new(what: &'static str, caps: Caps, metrics: LimitMetrics) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            what,
            caps,
            counts: Mutex::new(Counts {
                total: 0,
                peak: 0,
                per_ip: HashMap::new(),
                last_log: None,
            }),
            metrics,
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts are plain integers: a panic elsewhere cannot leave them
        // half-changed, so a poisoned lock is simply taken over.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit for a new connection from `ip`, or why there is none (counted and
    /// logged, rate-limited).
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refusal> {
        let ip = crate::net::canonical_ip(ip);
        let mut c = self.counts();
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        let refusal = if c.total >= self.caps.total {
            Some(Refusal::Total)
        } else if from_ip >= self.caps.per_ip {
            Some(Refusal::PerIp)
        } else {
            None
        };
        if let Some(r) = refusal {
            let (reason, limit, key) = match r {
                Refusal::Total => ("total", self.caps.total, self.caps.total_key),
                Refusal::PerIp => ("per_ip", self.caps.per_ip, self.caps.per_ip_key),
            };
            self.metrics.refused(reason);
            let now = Instant::now();
            if c.last_log
                .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
            {
                c.last_log = Some(now);
                // The address is the client's, not a secret; it helps find the source.
                tracing::warn!(
                    client = %ip,
                    limit,
                    "{} connection refused: {reason} connection cap reached (raise {key} \
                     if this is legitimate load; further refusals are counted in the \
                     metrics and logged at most once a minute)",
                    self.what,
                );
            }
            return Err(r);
        }
        c.total += 1;
        c.peak = c.peak.max(c.total);
        *c.per_ip.entry(ip).or_insert(0) += 1;
        self.metrics.open.set(c.total as i64);
        Ok(ConnPermit {
            limiter: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts().total
    }

    fn release(&self, ip: IpAddr) {
        let mut c = self.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
        }
        self.metrics.open.set(c.total as i64);
        // After a burst (hundreds of connections, most of them gone), give the freed
        // memory back to the system: the allocator keeps it otherwise.
        let trim = c.peak >= TRIM_AFTER && c.total <= c.peak / 4;
        if trim {
            c.peak = c.total;
        }
        drop(c);
        if trim {
            give_back_memory();
        }
    }
}

/// Bursts of at least this many connections give memory back when they are over.
const TRIM_AFTER: usize = 256;

/// Returns free heap memory to the system (glibc keeps it in its arenas).
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One open connection; dropping it frees its place.
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limiter.release(self.ip);
    }
}

/// Paces an accept loop after errors and says, once a minute at most, what is
/// wrong. Out of file descriptors (EMFILE, ENFILE) is the usual cause: new
/// connections wait in the kernel's backlog (and time out there) while existing
/// connections and UDP go on.
pub struct AcceptBackoff {
    what: &'static str,
    delay: Duration,
    last_log: Option<Instant>,
    metrics: LimitMetrics,
    /// The spare descriptor (`/dev/null`).
    spare: Option<std::fs::File>,
}

/// Connections closed at once per accept error while out of descriptors.
const SHED_MAX: usize = 64;

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    pub fn new(what: &'static str, metrics: LimitMetrics) -> AcceptBackoff {
        AcceptBackoff {
            what,
            delay: BACKOFF_MIN,
            last_log: None,
            metrics,
            spare: std::fs::File::open("/dev/null").ok(),
        }
    }

    /// After an accept error `e`: when out of file descriptors, frees the spare one,
    /// accepts the connections already waiting and closes each at once (counted as
    /// refused), then takes the spare back. Returns how many were closed.
    pub fn shed(&mut self, e: &io::Error, listener: &tokio::net::TcpListener) -> usize {
        use futures_util::FutureExt;
        if !is_fd_limit(e) {
            return 0;
        }
        let mut shed = 0;
        if self.spare.take().is_some() {
            while shed < SHED_MAX {
                match listener.accept().now_or_never() {
                    Some(Ok((stream, _))) => {
                        drop(stream);
                        self.metrics.refused("fd_limit");
                        shed += 1;
                    }
                    _ => break,
                }
            }
        }
        self.spare = std::fs::File::open("/dev/null").ok();
        shed
    }

    /// A connection was accepted: the next error starts the backoff afresh.
    pub fn accepted(&mut self) {
        self.delay = BACKOFF_MIN;
    }

    /// Counts and logs (rate-limited) an accept error; returns how long to pause
    /// before accepting again (doubling up to a second while errors go on).
    pub fn failed(&mut self, e: &io::Error) -> Duration {
        self.metrics.refused("accept_error");
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            self.last_log = Some(now);
            if is_fd_limit(e) {
                let limit = fd_limit()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "unknown".into());
                tracing::error!(
                    error = %e,
                    open_files_limit = %limit,
                    "{}: out of file descriptors; new connections are closed at once \
                     until some close (UDP and open connections are not affected). Raise \
                     the limit: LimitNOFILE= in the systemd unit, or `ulimit -n` before \
                     starting",
                    self.what,
                );
            } else {
                tracing::warn!(error = %e, "{}: accept failed; pausing", self.what);
            }
        }
        let d = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        d
    }
}

fn is_fd_limit(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// The soft limit on open files (`RLIMIT_NOFILE`).
pub fn fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0).then_some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(total: usize, per_ip: usize) -> Arc<ConnLimiter> {
        ConnLimiter::new(
            "test",
            Caps {
                total,
                per_ip,
                total_key: "t.total",
                per_ip_key: "t.per_ip",
            },
            LimitMetrics::default(),
        )
    }

    #[test]
    fn caps_total_and_per_address_and_frees_on_drop() {
        let l = limiter(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).err(), Some(Refusal::PerIp));
        // The mapped form is the same address.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(l.try_acquire(mapped).err(), Some(Refusal::PerIp));
        let _p3 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).err(), Some(Refusal::Total));
        assert_eq!(l.open(), 3);
        drop(p1);
        assert_eq!(l.open(), 2);
        let _p4 = l.try_acquire(a).unwrap();
        assert_eq!(
            l.metrics
                .refused
                .get_or_create(&RefusalLabels { reason: "per_ip" })
                .get(),
            2
        );
        assert_eq!(
            l.metrics
                .refused
                .get_or_create(&RefusalLabels { reason: "total" })
                .get(),
            1
        );
        assert_eq!(l.metrics.open.get(), 3);
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::new("test", LimitMetrics::default());
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_fd_limit(&e));
        let delays: Vec<Duration> = (0..10).map(|_| b.failed(&e)).collect();
        assert_eq!(delays[0], BACKOFF_MIN);
        assert_eq!(delays[1], BACKOFF_MIN * 2);
        assert_eq!(*delays.last().unwrap(), BACKOFF_MAX);
        b.accepted();
        assert_eq!(b.failed(&e), BACKOFF_MIN);
        assert!(fd_limit().is_some_and(|n| n > 0));
    }
}
