//! Prometheus metrics: one registry, filled at start by each module's own metric
//! struct (`register(&mut Registry)`), encoded as text for `GET /metrics`. Process
//! figures (RSS, open files, CPU) are read from /proc at scrape time.

use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The frozen registry plus scrape-time process gauges.
pub struct Metrics {
    registry: Registry,
    process: ProcessMetrics,
}

struct ProcessMetrics {
    resident_memory_bytes: Gauge<f64, AtomicU64>,
    open_fds: Gauge,
    cpu_seconds: Gauge<f64, AtomicU64>,
    threads: Gauge,
}

impl Metrics {
    /// Takes the registry every module has registered into.
    pub fn new(mut registry: Registry) -> Metrics {
        let process = ProcessMetrics {
            resident_memory_bytes: Gauge::default(),
            open_fds: Gauge::default(),
            cpu_seconds: Gauge::default(),
            threads: Gauge::default(),
        };
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let start_gauge: Gauge = Gauge::default();
        start_gauge.set(start);
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch",
            start_gauge,
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory size",
            process.resident_memory_bytes.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            process.open_fds.clone(),
        );
        registry.register(
            "process_cpu_seconds",
            "User and system CPU time spent",
            process.cpu_seconds.clone(),
        );
        registry.register("process_threads", "OS threads", process.threads.clone());
        Metrics { registry, process }
    }

    /// Prometheus/OpenMetrics text. Only a formatting error can fail it, which writing
    /// to a `String` does not produce; the caller reports one if it ever happens.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        self.process.refresh();
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl ProcessMetrics {
    fn refresh(&self) {
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory_bytes.set(rss as f64);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces) start at ')'.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 here.
                let ticks: u64 = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                    + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                self.cpu_seconds.set(ticks as f64 / clock_ticks());
                if let Some(t) = f.get(17).and_then(|v| v.parse::<i64>().ok()) {
                    self.threads.set(t);
                }
            }
        }
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Resident set size of this process in bytes, from /proc/self/statm.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * if page > 0 { page as u64 } else { 4096 })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: &'static str,
    pub status: u16,
}

/// What a connection on the HTTPS port turned out to be.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    /// `http`, `turn-tcp`, `turn-tls`, `acme-tls` (an ACME CA validating TLS-ALPN-01),
    /// `rejected` (not TLS, STUN or ChannelData; or TURN while the relay is off) or
    /// `timed-out` (too few bytes to decide in time).
    pub kind: &'static str,
}

/// HTTP request counters.
#[derive(Clone, Default)]
pub struct HttpMetrics {
    pub requests: Family<HttpLabels, Counter>,
    pub tls_handshake_failures: Counter,
    pub connections: Counter,
    pub classified: Family<PortLabels, Counter>,
}

impl HttpMetrics {
    /// Counts one connection on the HTTPS port as `kind`.
    pub fn classified(&self, kind: &'static str) {
        self.classified.get_or_create(&PortLabels { kind }).inc();
    }

    pub fn register(registry: &mut Registry) -> HttpMetrics {
        let m = HttpMetrics::default();
        registry.register(
            "meshmeet_http_requests",
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        registry.register(
            "meshmeet_http_tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "meshmeet_http_connections",
            "Accepted HTTPS connections",
            m.connections.clone(),
        );
        registry.register(
            "meshmeet_https_port_connections",
            "Connections on the HTTPS port by what they speak (http, turn-tcp, turn-tls, acme-tls, rejected, timed-out)",
            m.classified.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_process_and_http() {
        let mut reg = Registry::default();
        let http = HttpMetrics::register(&mut reg);
        http.requests
            .get_or_create(&HttpLabels {
                route: "index",
                status: 200,
            })
            .inc();
        let m = Metrics::new(reg);
        let text = m.encode().unwrap();
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.contains("meshmeet_http_requests_total{route=\"index\",status=\"200\"} 1"));
        assert!(resident_memory_bytes().unwrap() > 0);
    }
}
