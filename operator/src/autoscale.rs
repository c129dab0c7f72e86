//! The worker fleet follows its work, with no extra component to install:
//! the leading operator reads the backlog of the workers' task consumer
//! (pending + ack-pending, from JetStream's consumer info) and sets the
//! worker Deployment's replicas through its `scale` subresource.
//!
//! - desired = clamp(ceil(backlog / target per replica), min, max);
//! - up at once, at most doubling (and at least +4) per step;
//! - down only to the highest recommendation of the quiet period (the
//!   HorizontalPodAutoscaler's stabilization window), so a lull does not
//!   shrink the fleet that a burst will need again;
//! - to zero only when allowed and the backlog stayed empty for the whole
//!   quiet period;
//! - an unreadable consumer holds the current count (never a jump to max),
//!   and says so: a Warning event on the Deployment and a metric;
//! - before scaling in, each worker pod gets the pod-deletion-cost of the
//!   tasks it runs (from the workers' heartbeats), so idle pods go first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, ResourceExt};
use prost::Message as _;
use stowage_proto::v1::WorkerHeartbeat;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use crate::metrics::AutoscaleMetrics;

/// What the autoscaler works with: the API, the queue's backlog and the
/// workers' heartbeats, events on the Deployment, its metrics.
#[derive(Clone)]
pub struct Fleet {
    pub client: kube::Client,
    pub queue: stowage_common::queue::Queue,
    pub recorder: kube::runtime::events::Recorder,
    pub metrics: AutoscaleMetrics,
}

/// What the autoscaler is told (flags `--autoscale-*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The worker Deployment and its namespace.
    pub deployment: String,
    pub namespace: String,
    pub min: u32,
    pub max: u32,
    /// Tasks one worker takes on (its capacity, by default).
    pub target_per_replica: u32,
    /// How long the backlog must have asked for fewer workers before the
    /// fleet shrinks.
    pub quiet: Duration,
    /// May the fleet go to zero workers when there is nothing to do?
    pub to_zero: bool,
    /// How often the backlog is read.
    pub interval: Duration,
}

/// What to do with the fleet now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Leave it as it is.
    Keep,
    /// Set the replicas.
    Scale { from: u32, to: u32 },
    /// Leave it as it is because the backlog cannot be read.
    Hold,
}

/// The scaler's memory: recent recommendations (the quiet period's window)
/// and since when the backlog has been empty.
#[derive(Default)]
pub struct Scaler {
    recommendations: VecDeque<(Instant, u32)>,
    empty_since: Option<Instant>,
}

impl Scaler {
    /// The decision for `backlog` tasks (`None`: unreadable) with `current`
    /// replicas at `now`, and the replicas it recommends (for the metric).
    pub fn decide(
        &mut self,
        s: &Settings,
        backlog: Option<u64>,
        current: u32,
        now: Instant,
    ) -> (Decision, Option<u32>) {
        let Some(backlog) = backlog else {
            return (Decision::Hold, None);
        };
        if backlog == 0 {
            self.empty_since.get_or_insert(now);
        } else {
            self.empty_since = None;
        }
        let quiet_and_empty = self
            .empty_since
            .is_some_and(|t| now.saturating_duration_since(t) >= s.quiet);
        let floor = if s.to_zero && quiet_and_empty {
            0
        } else {
            s.min.max(1)
        };
        let ceiling = s.max.max(floor);
        let needed = backlog.div_ceil(u64::from(s.target_per_replica.max(1)));
        let recommended = u32::try_from(needed)
            .unwrap_or(u32::MAX)
            .clamp(floor, ceiling);
        self.recommendations.push_back((now, recommended));
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > s.quiet)
        {
            self.recommendations.pop_front();
        }
        let decision = if recommended > current {
            // Up at once, but at most doubling (and at least +4) per step.
            let step = current.max(4);
            let to = recommended.min(current.saturating_add(step));
            Decision::Scale { from: current, to }
        } else {
            // Down only to the highest recommendation of the quiet period
            // (none but the floor if the backlog stayed empty all along).
            let highest = if floor == 0 {
                0
            } else {
                self.recommendations
                    .iter()
                    .map(|(_, r)| *r)
                    .max()
                    .unwrap_or(recommended)
            };
            if highest < current {
                Decision::Scale {
                    from: current,
                    to: highest,
                }
            } else {
                Decision::Keep
            }
        };
        (decision, Some(recommended))
    }
}

/// The workers' last heartbeats: worker id → tasks in flight.
type Loads = Arc<Mutex<HashMap<String, (u32, Instant)>>>;

/// Heartbeats older than this are not trusted (the worker may be gone).
const STALE_HEARTBEAT: Duration = Duration::from_secs(30);

/// Runs until the future is dropped (leadership lost, shutdown).
pub async fn run(ctx: Fleet, s: Settings) {
    let loads = Loads::default();
    let _listener = AbortOnDropHandle::new(tokio::spawn(follow_heartbeats(
        ctx.queue.clone(),
        Arc::clone(&loads),
    )));
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &s.namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &s.namespace);
    let mut scaler = Scaler::default();
    let mut holding = false;
    let mut tick = tokio::time::interval(s.interval.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        deployment = s.deployment,
        namespace = s.namespace,
        min = s.min,
        max = s.max,
        "autoscaling the worker fleet"
    );
    loop {
        tick.tick().await;
        let m = &ctx.metrics;
        let backlog = match ctx.queue.backlog().await {
            Ok(b) => {
                m.backlog.set(i64::try_from(b).unwrap_or(i64::MAX));
                m.readable.set(1);
                Some(b)
            }
            Err(e) => {
                m.readable.set(0);
                m.holds.inc();
                if !holding {
                    warn!(error = %e, "cannot read the task backlog; holding the worker count");
                    event(
                        &ctx,
                        &s,
                        EventType::Warning,
                        "BacklogUnreadable",
                        format!("the worker count is held: the task backlog cannot be read ({e})"),
                    )
                    .await;
                }
                holding = true;
                continue;
            }
        };
        holding = false;
        let scale = match deployments.get_scale(&s.deployment).await {
            Ok(scale) => scale,
            Err(e) => {
                warn!(error = %e, deployment = s.deployment, "cannot read the worker Deployment's scale");
                m.errors.inc();
                continue;
            }
        };
        let current = scale
            .spec
            .as_ref()
            .and_then(|spec| spec.replicas)
            .and_then(|r| u32::try_from(r).ok())
            .unwrap_or(0);
        m.replicas.set(i64::from(current));
        let (decision, recommended) = scaler.decide(&s, backlog, current, Instant::now());
        if let Some(r) = recommended {
            m.desired.set(i64::from(r));
        }
        let Decision::Scale { from, to } = decision else {
            continue;
        };
        if to < from {
            let selector = scale.status.as_ref().and_then(|st| st.selector.clone());
            if let Some(selector) = selector
                && let Err(e) = mark_idle_pods(&pods, &selector, &loads).await
            {
                warn!(error = %e, "could not set the worker pods' deletion cost");
            }
        }
        let patch = serde_json::json!({"spec": {"replicas": to}});
        match deployments
            .patch_scale(
                &s.deployment,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                m.scalings.inc();
                info!(from, to, backlog, "worker fleet scaled");
                event(
                    &ctx,
                    &s,
                    EventType::Normal,
                    "Scaled",
                    format!(
                        "worker replicas {from} → {to} for a backlog of {} tasks",
                        backlog.unwrap_or_default()
                    ),
                )
                .await;
            }
            Err(e) => {
                m.errors.inc();
                warn!(error = %e, from, to, "scaling the worker fleet failed");
            }
        }
    }
}

/// Keeps the latest heartbeat of every worker.
async fn follow_heartbeats(queue: stowage_common::queue::Queue, loads: Loads) {
    let subject = queue.topology().worker_wildcard();
    let mut sub = match queue.client().subscribe(subject).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot follow worker heartbeats; scale-in picks pods blindly");
            return;
        }
    };
    while let Some(msg) = sub.next().await {
        if let Ok(beat) = WorkerHeartbeat::decode(msg.payload.as_ref())
            && let Ok(mut l) = loads.lock()
        {
            l.insert(beat.worker_id, (beat.in_flight, Instant::now()));
            l.retain(|_, (_, seen)| seen.elapsed() < STALE_HEARTBEAT * 4);
        }
    }
}

/// The annotation the ReplicaSet controller reads: pods with a lower cost
/// are deleted first when a Deployment scales in.
const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Gives every worker pod the deletion cost of the tasks it runs, so that
/// idle pods are the ones removed.
async fn mark_idle_pods(pods: &Api<Pod>, selector: &str, loads: &Loads) -> Result<(), kube::Error> {
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    for pod in list.items {
        let name = pod.name_any();
        let in_flight = loads
            .lock()
            .ok()
            .and_then(|l| l.get(&name).copied())
            .filter(|(_, seen)| seen.elapsed() < STALE_HEARTBEAT)
            .map_or(0, |(n, _)| n);
        let cost = in_flight.to_string();
        if pod.annotations().get(DELETION_COST) == Some(&cost) {
            continue;
        }
        let patch = serde_json::json!({"metadata": {"annotations": {DELETION_COST: cost}}});
        pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

/// An event about the worker Deployment.
async fn event(ctx: &Fleet, s: &Settings, type_: EventType, reason: &str, note: String) {
    let regarding = ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("Deployment".into()),
        name: Some(s.deployment.clone()),
        namespace: Some(s.namespace.clone()),
        ..Default::default()
    };
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Autoscale".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &regarding).await {
        warn!(error = %e, reason, "could not publish an autoscaling event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            deployment: "stowage-worker".into(),
            namespace: "stowage".into(),
            min: 1,
            max: 10,
            target_per_replica: 4,
            quiet: Duration::from_secs(300),
            to_zero: false,
            interval: Duration::from_secs(15),
        }
    }

    #[test]
    fn the_backlog_sets_the_replicas_within_bounds() {
        let s = settings();
        let t0 = Instant::now();
        let mut sc = Scaler::default();
        assert_eq!(
            sc.decide(&s, Some(13), 1, t0),
            (Decision::Scale { from: 1, to: 4 }, Some(4)),
            "ceil(13 / 4) = 4, from 1 at most +4"
        );
        let mut sc = Scaler::default();
        assert_eq!(
            sc.decide(&s, Some(1000), 4, t0).0,
            Decision::Scale { from: 4, to: 8 },
            "at most doubling per step"
        );
        assert_eq!(
            sc.decide(&s, Some(1000), 8, t0).0,
            Decision::Scale { from: 8, to: 10 },
            "never above max"
        );
        assert_eq!(sc.decide(&s, Some(1000), 10, t0).0, Decision::Keep);
    }

    #[test]
    fn scaling_down_waits_for_the_quiet_period() {
        let s = settings();
        let t0 = Instant::now();
        let mut sc = Scaler::default();
        assert_eq!(sc.decide(&s, Some(40), 10, t0).0, Decision::Keep);
        // The burst is over: a minute later the backlog asks for one.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(sc.decide(&s, Some(0), 10, t1), (Decision::Keep, Some(1)));
        // Past the quiet period, down to the highest recommendation since.
        let t2 = t0 + Duration::from_secs(301);
        assert_eq!(
            sc.decide(&s, Some(0), 10, t2).0,
            Decision::Scale { from: 10, to: 1 }
        );
    }

    #[test]
    fn zero_only_when_allowed_and_empty_for_the_quiet_period() {
        let mut s = settings();
        let t0 = Instant::now();
        let mut sc = Scaler::default();
        assert_eq!(
            sc.decide(&s, Some(0), 1, t0).0,
            Decision::Keep,
            "not allowed"
        );
        s.to_zero = true;
        let mut sc = Scaler::default();
        assert_eq!(sc.decide(&s, Some(0), 1, t0).0, Decision::Keep);
        // Empty for less than the quiet period: still one.
        let t1 = t0 + Duration::from_secs(200);
        assert_eq!(sc.decide(&s, Some(0), 1, t1), (Decision::Keep, Some(1)));
        // Empty for the whole quiet period, and every recommendation of
        // it was one at most: now zero.
        let much_later = t0 + Duration::from_secs(301);
        assert_eq!(
            sc.decide(&s, Some(0), 1, much_later).0,
            Decision::Scale { from: 1, to: 0 }
        );
        // Work arrives: up from zero at once.
        assert_eq!(
            sc.decide(&s, Some(3), 0, much_later).0,
            Decision::Scale { from: 0, to: 1 }
        );
    }

    #[test]
    fn an_unreadable_backlog_holds_the_count() {
        let s = settings();
        let mut sc = Scaler::default();
        assert_eq!(
            sc.decide(&s, None, 7, Instant::now()),
            (Decision::Hold, None)
        );
    }

    #[test]
    fn odd_settings_cannot_panic() {
        let mut s = settings();
        s.target_per_replica = 0;
        s.max = 0;
        s.min = u32::MAX;
        let mut sc = Scaler::default();
        let (d, r) = sc.decide(&s, Some(u64::MAX), u32::MAX, Instant::now());
        assert_eq!(r, Some(u32::MAX));
        assert_eq!(d, Decision::Keep);
    }
}
