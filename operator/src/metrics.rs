//! The operator's Prometheus metrics (`stowage_operator_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    /// `kubernetes`, `database`, `queue`, `storage`, `credentials`.
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

/// The autoscaler's view of the worker fleet.
#[derive(Clone, Default)]
pub struct AutoscaleMetrics {
    /// Pending + ack-pending tasks at the last read.
    pub backlog: Gauge,
    /// 1 when the last read of the backlog succeeded.
    pub readable: Gauge,
    /// Replicas the backlog asks for (before the quiet period's smoothing).
    pub desired: Gauge,
    /// The worker Deployment's replicas at the last look.
    pub replicas: Gauge,
    pub scalings: Counter,
    /// Rounds the count was held because the backlog could not be read.
    pub holds: Counter,
    /// Failed reads or writes of the Deployment's scale.
    pub errors: Counter,
}

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<ControllerLabel, Histogram>,
    /// 1 while this replica leads.
    pub leader: Gauge,
    pub leader_changes: Counter,
    pub autoscale: AutoscaleMetrics,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 12))
            }),
            leader: Gauge::default(),
            leader_changes: Counter::default(),
            autoscale: AutoscaleMetrics::default(),
        };
        let r = registry.sub_registry_with_prefix("stowage_operator");
        r.register(
            "reconciles",
            "Reconciles run, by controller and result",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconcile errors, by controller and class",
            m.errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            m.duration.clone(),
        );
        r.register(
            "leader",
            "1 while this replica is the leader",
            m.leader.clone(),
        );
        r.register(
            "leadership_acquired",
            "Times this replica became the leader",
            m.leader_changes.clone(),
        );
        let a = &m.autoscale;
        let r = r.sub_registry_with_prefix("autoscale");
        r.register(
            "backlog",
            "Tasks pending or in flight on the workers' consumer, at the last read",
            a.backlog.clone(),
        );
        r.register(
            "backlog_readable",
            "1 when the last read of the task backlog succeeded",
            a.readable.clone(),
        );
        r.register(
            "desired_replicas",
            "Worker replicas the backlog asks for",
            a.desired.clone(),
        );
        r.register(
            "replicas",
            "Worker replicas at the last look",
            a.replicas.clone(),
        );
        r.register(
            "scalings",
            "Times the worker fleet was scaled",
            a.scalings.clone(),
        );
        r.register(
            "holds",
            "Rounds the worker count was held because the backlog could not be read",
            a.holds.clone(),
        );
        r.register(
            "errors",
            "Failed reads or writes of the worker Deployment's scale",
            a.errors.clone(),
        );
        m
    }
}
