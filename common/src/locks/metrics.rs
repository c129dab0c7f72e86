//! Prometheus metrics of the lock library, labelled by lock class.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::LockClass;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

fn label(class: LockClass) -> ClassLabel {
    ClassLabel {
        class: class.as_str(),
    }
}

fn seconds_histogram() -> Histogram {
    // 1 ms … ~1 h
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

/// Counters and gauges of lock activity. Cheap to clone; clones share values.
#[derive(Clone)]
pub struct LockMetrics {
    acquired: Family<ClassLabel, Counter>,
    contended: Family<ClassLabel, Counter>,
    timed_out: Family<ClassLabel, Counter>,
    lost: Family<ClassLabel, Counter>,
    held: Family<ClassLabel, Gauge>,
    wait_seconds: Family<ClassLabel, Histogram, fn() -> Histogram>,
    held_seconds: Family<ClassLabel, Histogram, fn() -> Histogram>,
}

impl Default for LockMetrics {
    fn default() -> Self {
        LockMetrics {
            acquired: Family::default(),
            contended: Family::default(),
            timed_out: Family::default(),
            lost: Family::default(),
            held: Family::default(),
            wait_seconds: Family::new_with_constructor(seconds_histogram),
            held_seconds: Family::new_with_constructor(seconds_histogram),
        }
    }
}

impl LockMetrics {
    /// Registers the metrics as `stowage_lock_*` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = LockMetrics::default();
        let r = registry.sub_registry_with_prefix("stowage_lock");
        r.register("acquired", "Advisory locks acquired", m.acquired.clone());
        r.register(
            "contended",
            "Lock attempts that found the lock taken",
            m.contended.clone(),
        );
        r.register(
            "timed_out",
            "Lock waits that gave up at their timeout",
            m.timed_out.clone(),
        );
        r.register(
            "lost",
            "Held locks whose session was lost before release",
            m.lost.clone(),
        );
        r.register("held", "Session locks currently held", m.held.clone());
        r.register(
            "wait_seconds",
            "Time from asking for a lock to holding it",
            m.wait_seconds.clone(),
        );
        r.register(
            "held_seconds",
            "Time a session lock was held",
            m.held_seconds.clone(),
        );
        m
    }

    pub(super) fn acquired(&self, class: LockClass, waited: Duration) {
        self.acquired.get_or_create(&label(class)).inc();
        self.held.get_or_create(&label(class)).inc();
        self.wait_seconds
            .get_or_create(&label(class))
            .observe(waited.as_secs_f64());
    }

    pub(super) fn released(&self, class: LockClass, held_for: Duration) {
        self.held.get_or_create(&label(class)).dec();
        self.held_seconds
            .get_or_create(&label(class))
            .observe(held_for.as_secs_f64());
    }

    pub(super) fn contended(&self, class: LockClass) {
        self.contended.get_or_create(&label(class)).inc();
    }

    pub(super) fn timed_out(&self, class: LockClass) {
        self.timed_out.get_or_create(&label(class)).inc();
    }

    pub(super) fn lost(&self, class: LockClass) {
        self.lost.get_or_create(&label(class)).inc();
    }

    /// Session locks of `class` held right now by this process.
    pub fn held_now(&self, class: LockClass) -> i64 {
        self.held.get_or_create(&label(class)).get()
    }

    /// How many times a lock of `class` was found taken.
    pub fn contended_total(&self, class: LockClass) -> u64 {
        self.contended.get_or_create(&label(class)).get()
    }

    /// How many waits for a lock of `class` timed out.
    pub fn timed_out_total(&self, class: LockClass) -> u64 {
        self.timed_out.get_or_create(&label(class)).get()
    }
}
