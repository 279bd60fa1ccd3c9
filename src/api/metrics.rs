//! Prometheus metrics of the HTTP layer: request counts and latency histograms by route, method
//! and status, in the region's registry (one per region, so several regions in one process keep
//! separate figures).

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

pub struct HttpMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    forwarded_in: IntCounterVec,
}

impl HttpMetrics {
    pub fn new(registry: &Registry) -> HttpMetrics {
        let labels = &["route", "method", "status"];
        let requests = IntCounterVec::new(
            Opts::new(
                "locus_http_requests_total",
                "HTTP requests answered, by route, method and status",
            ),
            labels,
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "locus_http_request_duration_seconds",
                "HTTP request latency, by route, method and status",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            labels,
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(latency.clone()))
            .expect("unique metric");
        // What a client that routes well saves: each of these cost a hop between regions.
        let forwarded_in = IntCounterVec::new(
            Opts::new(
                "locus_forwarded_requests_received_total",
                "Requests a peer forwarded here (writes and home reads sent to a region that is not the home), by peer",
            ),
            &["from"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(forwarded_in.clone()))
            .expect("unique metric");
        HttpMetrics {
            registry: registry.clone(),
            requests,
            latency,
            forwarded_in,
        }
    }

    pub fn observe(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let status = status.to_string();
        let labels = [route, method, status.as_str()];
        self.requests.with_label_values(&labels).inc();
        self.latency
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn forwarded_from(&self, peer: &str) {
        self.forwarded_in.with_label_values(&[peer]).inc();
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric in the registry.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
