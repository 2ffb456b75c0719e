//! The imperative shell around the state machine: load, step, commit, act.
//!
//! Every change to a rollout goes through [`Engine::apply`]: the pure machine computes the next
//! rollout and its effects, the store commits and flushes them with the event, and only then does
//! [`Engine::drive`] carry out the effects through the provider. Each effect's outcome comes back
//! as another event. A process killed at any point resumes from the store: committed effects that
//! were not confirmed are still pending and are carried out again, and since providers reconcile
//! (read, compare, write the difference) doing one twice changes nothing.

use std::time::Duration;

use thiserror::Error;

use crate::crash;
use crate::domain::event::{Effect, Event, EventKind, PendingEffect, Trigger, TriggerSource};
use crate::domain::gate;
use crate::domain::machine::{self, Rejection};
use crate::domain::plan::{self, Plan, PlanErrors};
use crate::domain::rollout::{PhaseObservation, Rollout, RolloutStatus};
use crate::domain::time::Timestamp;
use crate::notifier::{Delivery, Notifier};
use crate::provider::{Outcome, PhaseScope, Provider, ProviderError};
use crate::store::{Attached, EventRecord, PlanRecord, Store, StoreError, StoredRollout};

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Provider(#[from] ProviderError),
    #[error("{0}")]
    Rejected(#[from] Rejection),
    #[error("the plan is invalid:\n{0}")]
    Plan(PlanErrors),
    #[error("{0}")]
    Invalid(String),
    /// Another rollout drives what this one would change.
    #[error("{0}")]
    Claimed(String),
}

/// Why [`Engine::drive`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriveOutcome {
    /// Nothing more happens without a person (or the rollout is finished).
    Stopped(RolloutStatus),
    /// Nothing to do for this long (real time).
    Wait(Duration),
}

/// How far one call of [`Engine::drive`] goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Do what is due now, never wait (cron-style `run --once`).
    Once,
    /// Keep going; jump virtual time, return only to wait for real time or a person.
    Continuous,
}

/// A rollout loaded with the plan it runs.
pub struct Loaded {
    pub stored: StoredRollout,
    pub plan: Plan,
    pub plan_record: PlanRecord,
}

/// Receives every committed event (for progress output).
pub type Observer<'a> = &'a mut dyn FnMut(&Plan, &Rollout, &EventRecord);

pub struct Engine<'s> {
    pub store: &'s Store,
    /// Delivers the outbox's webhook notifications.
    pub notifier: &'s dyn Notifier,
    /// Recorded as the actor of automatic events (`run`, `demo`).
    pub actor: String,
    pub retry: RetryPolicy,
}

/// How often and how patiently a failing provider call is retried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Capped exponential backoff with deterministic jitter, or what the backend asked for.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, jitter_seed: u64) -> Duration {
        if let Some(asked) = retry_after {
            return asked;
        }
        let exponential = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        let jitter = (jitter_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) % 1000;
        exponential.mul_f64(0.5 + jitter as f64 / 2000.0)
    }
}

pub fn load(store: &Store, id: &str) -> Result<Loaded, EngineError> {
    let stored = store.rollout(id)?;
    let plan_record = store.plan(id, &stored.rollout.plan_hash)?;
    let plan = plan::parse(&plan_record.path, &plan_record.source).map_err(EngineError::Plan)?;
    stored
        .rollout
        .check_invariants(&plan)
        .map_err(|e| EngineError::Invalid(format!("rollout `{id}` is inconsistent: {e}")))?;
    Ok(Loaded {
        stored,
        plan,
        plan_record,
    })
}

fn wall_clock() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

impl Engine<'_> {
    /// Creates and starts a rollout (its effects run on the next `drive`). Returns the first
    /// event and the preflight's warnings, which are also recorded with it.
    pub async fn start(
        &self,
        plan: &Plan,
        plan_record: PlanRecord,
        id: &str,
        by: &str,
        provider: &mut dyn Provider,
    ) -> Result<(EventRecord, Vec<String>), EngineError> {
        let preflight = provider.preflight(plan).await?;
        if let Some((other, resource)) = self.store.claimant(&preflight.resources, id)? {
            return Err(EngineError::Claimed(format!(
                "rollout `{other}` already drives {resource}; one rollout at a time may change it (finish or abort `{other}` first)"
            )));
        }
        let now = provider.now();
        let rollout = Rollout::new(id, plan, by, now);
        let event = Event {
            kind: EventKind::Start {
                plan_hash: plan.hash.clone(),
            },
            trigger: Trigger::user(by, "rollout started"),
        };
        let mut transition = machine::step(plan, &rollout, &event, now)?;
        transition
            .notes
            .extend(preflight.warnings.iter().map(|w| format!("warning: {w}")));
        let record = event_record(&rollout, &transition, event, now);
        let record = self.store.create(
            &transition.rollout,
            record,
            &plan_record,
            &preflight.resources,
        )?;
        Ok((record, preflight.warnings))
    }

    /// Applies one event and commits the result; `None` if it changed nothing.
    pub fn apply(
        &self,
        loaded: &mut Loaded,
        event: Event,
        now: Timestamp,
        provider_record: Option<&serde_json::Value>,
    ) -> Result<Option<EventRecord>, EngineError> {
        let transition = machine::step(&loaded.plan, &loaded.stored.rollout, &event, now)?;
        if transition.rollout == loaded.stored.rollout {
            return Ok(None);
        }
        transition
            .rollout
            .check_invariants(&loaded.plan)
            .map_err(|e| {
                EngineError::Invalid(format!("refusing an inconsistent transition: {e}"))
            })?;
        let plan_record =
            matches!(event.kind, EventKind::PlanChanged { .. }).then_some(&loaded.plan_record);
        let record = event_record(&loaded.stored.rollout, &transition, event, now);
        crash::point("commit.before");
        let record = self.store.commit(
            &loaded.stored,
            &transition.rollout,
            record,
            Attached {
                plan: plan_record,
                record: provider_record,
                claims: None,
            },
        )?;
        loaded.stored = StoredRollout {
            rollout: Rollout {
                last_seq: record.seq,
                ..transition.rollout
            },
            last_hash: record.hash.clone(),
        };
        Ok(Some(record))
    }

    /// A person's command on a rollout (approve, pause, rollback, ...).
    pub fn submit(
        &self,
        id: &str,
        kind: EventKind,
        by: &str,
        reason: &str,
        provider: &dyn Provider,
    ) -> Result<Option<EventRecord>, EngineError> {
        let mut loaded = load(self.store, id)?;
        let reopens = matches!(
            kind,
            EventKind::RollbackRequested { .. } | EventKind::AbortRequested
        ) && loaded.stored.rollout.status == RolloutStatus::Completed;
        if reopens
            && let Some((other, resource)) = self.store.claimant(&self.store.claims(id)?, id)?
        {
            return Err(EngineError::Claimed(format!(
                "rollout `{other}` now drives {resource}; `{id}` completed and can no longer change it"
            )));
        }
        let event = Event {
            kind,
            trigger: Trigger::user(by, reason),
        };
        self.apply(&mut loaded, event, provider.now(), None)
    }

    /// Picks up a changed plan file; errors leave the rollout untouched.
    fn notice_plan_change(
        &self,
        loaded: &mut Loaded,
        provider: &dyn Provider,
        observer: Observer<'_>,
    ) -> Result<(), EngineError> {
        let path = loaded.plan_record.path.clone();
        let Ok(source) = std::fs::read_to_string(&path) else {
            tracing::debug!(%path, "plan file not readable; running the stored plan");
            return Ok(());
        };
        let hash = plan::hash_source(&source);
        if hash == loaded.stored.rollout.plan_hash {
            return Ok(());
        }
        let new_plan = plan::parse(&path, &source).map_err(EngineError::Plan)?;
        let old = std::mem::replace(&mut loaded.plan, new_plan);
        let old_record = std::mem::replace(
            &mut loaded.plan_record,
            PlanRecord {
                path: path.clone(),
                source,
                hash: hash.clone(),
            },
        );
        let event = Event {
            kind: EventKind::PlanChanged { plan_hash: hash },
            trigger: Trigger::new(
                TriggerSource::Internal,
                &self.actor,
                format!("{path} changed"),
            ),
        };
        match self.apply(loaded, event, provider.now(), None) {
            Ok(record) => {
                if let Some(record) = record {
                    observer(&loaded.plan, &loaded.stored.rollout, &record);
                }
                Ok(())
            }
            Err(err) => {
                loaded.plan = old;
                loaded.plan_record = old_record;
                Err(err)
            }
        }
    }

    /// Drives one rollout as far as `pace` allows.
    pub async fn drive(
        &self,
        id: &str,
        provider: &mut dyn Provider,
        pace: Pace,
        observer: Observer<'_>,
    ) -> Result<DriveOutcome, EngineError> {
        let mut loaded = load(self.store, id)?;
        if !matches!(
            loaded.stored.rollout.status,
            RolloutStatus::Completed | RolloutStatus::Aborted
        ) {
            self.notice_plan_change(&mut loaded, provider, observer)?;
        }
        // Notifications whose webhook failed this time; they stay pending for the next run.
        let mut undeliverable = std::collections::BTreeSet::new();
        // Effects the tenant holds for approval are asked about once per drive.
        let mut asked = std::collections::BTreeSet::new();
        loop {
            let rollout = &loaded.stored.rollout;
            let configuration = rollout
                .pending
                .iter()
                .find(|p| !p.effect.is_notification())
                .filter(|p| may_carry_out(rollout, p, &asked))
                .cloned();
            if let Some(pending) = configuration {
                if rollout.tenant_approval.is_some() {
                    asked.insert(pending.id);
                }
                let record = self.carry_out(&mut loaded, &pending, provider).await?;
                if let Some(record) = record {
                    observer(&loaded.plan, &loaded.stored.rollout, &record);
                }
                continue;
            }
            let notification = rollout
                .pending
                .iter()
                .find(|p| p.effect.is_notification() && !undeliverable.contains(&p.id))
                .cloned();
            if let Some(pending) = notification {
                match self.deliver(&mut loaded, &pending, provider.now()).await {
                    Ok(Some(record)) => observer(&loaded.plan, &loaded.stored.rollout, &record),
                    Ok(None) => {}
                    Err(EngineError::Invalid(why)) => {
                        tracing::warn!(effect = %pending.id, %why, "notification not delivered; it stays pending");
                        undeliverable.insert(pending.id);
                    }
                    Err(other) => return Err(other),
                }
                continue;
            }
            let rollout = &loaded.stored.rollout;
            if should_stop(rollout) {
                return Ok(DriveOutcome::Stopped(rollout.status));
            }
            let now = provider.now();
            let agenda = machine::agenda(&loaded.plan, rollout, now);
            if !agenda.observe.is_empty() {
                let record = self.observe(&mut loaded, &agenda.observe, provider).await?;
                if let Some(record) = record {
                    observer(&loaded.plan, &loaded.stored.rollout, &record);
                }
                continue;
            }
            let Some(wake_at) = agenda.wake_at else {
                return Ok(DriveOutcome::Stopped(rollout.status));
            };
            if wake_at > now {
                if pace == Pace::Once || !provider.is_virtual() {
                    return Ok(DriveOutcome::Wait(provider.real_time_until(wake_at)));
                }
                provider.advance_to(wake_at).await?;
                crash::point("clock.advanced");
            }
            let tick = Event {
                kind: EventKind::Tick,
                trigger: Trigger::new(TriggerSource::Schedule, &self.actor, "deadline reached"),
            };
            match self.apply(&mut loaded, tick, provider.now().max(wake_at), None)? {
                Some(record) => observer(&loaded.plan, &loaded.stored.rollout, &record),
                None if wake_at <= now => {
                    // A deadline that has passed and changes nothing would spin; it never should.
                    tracing::warn!(%wake_at, "a past deadline changed nothing; waiting");
                    return Ok(DriveOutcome::Wait(Duration::from_secs(60)));
                }
                None => {}
            }
        }
    }

    /// Delivers one outbox notification (with retries) and records the delivery. `Invalid` means
    /// the webhook could not be reached this time.
    async fn deliver(
        &self,
        loaded: &mut Loaded,
        pending: &PendingEffect,
        now: Timestamp,
    ) -> Result<Option<EventRecord>, EngineError> {
        let Effect::Notify {
            url,
            secret_env,
            status,
            previous,
            reason,
            at,
        } = &pending.effect
        else {
            unreachable!("only notifications are delivered");
        };
        let rollout = &loaded.stored.rollout;
        let key = format!("{}:{}", rollout.id, pending.id);
        let body = serde_json::json!({
            "idempotencyKey": key,
            "rollout": rollout.id,
            "plan": rollout.plan_name,
            "status": status.as_str(),
            "previousStatus": previous.as_str(),
            "reason": reason,
            "at": at.rfc3339(),
        });
        let delivery = Delivery {
            key: &key,
            url,
            secret_env: secret_env.as_deref(),
            body: serde_json::to_vec(&body).expect("json serializes"),
        };
        crash::point("delivery.before");
        let mut attempt = 0;
        let status = loop {
            match self.notifier.deliver(&delivery).await {
                Ok(status) => break status,
                Err(e) if attempt + 1 < 3 => {
                    let delay =
                        self.retry
                            .delay(attempt, None, pending.id.seq ^ u64::from(attempt));
                    tracing::warn!(%url, error = %e, ?delay, "webhook delivery failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(EngineError::Invalid(e.to_string())),
            }
        };
        crash::point("delivery.after");
        let event = Event {
            kind: EventKind::Delivered {
                effect: pending.id,
                status,
            },
            trigger: Trigger::new(
                TriggerSource::Internal,
                "outbox",
                format!("{url} answered {status}"),
            ),
        };
        self.apply(loaded, event, now, None)
    }

    /// Carries out one pending effect and records its outcome.
    async fn carry_out(
        &self,
        loaded: &mut Loaded,
        pending: &PendingEffect,
        provider: &mut dyn Provider,
    ) -> Result<Option<EventRecord>, EngineError> {
        let target = loaded.plan.policy.clone();
        let id = loaded.stored.rollout.id.clone();
        let record = if pending.effect == Effect::CaptureBaseline {
            None
        } else {
            Some(self.store.record(&id)?.ok_or_else(|| {
                EngineError::Invalid(format!("rollout `{id}` has no recorded baseline"))
            })?)
        };
        let jitter_seed = pending.id.seq << 8 | u64::from(pending.id.index);
        if crash::mutation("confirm-before-act")
            && matches!(pending.effect, Effect::Reconcile { .. })
        {
            return self
                .confirm_then_act(loaded, pending, provider, &target, record.as_ref())
                .await;
        }
        crash::point("effect.before");
        let outcome =
            retrying(
                self.retry,
                jitter_seed,
                pending.effect.name(),
                async || match &pending.effect {
                    Effect::CaptureBaseline => provider
                        .capture_baseline(&target)
                        .await
                        .map(|record| Outcome::Done { changes: 0, record }),
                    Effect::Reconcile {
                        desired,
                        resolution,
                    } => {
                        provider
                            .reconcile(
                                &target,
                                desired,
                                *resolution,
                                record.as_ref().expect("loaded above"),
                            )
                            .await
                    }
                    Effect::RestoreBaseline => {
                        provider
                            .restore(&target, record.as_ref().expect("loaded above"))
                            .await
                    }
                    Effect::Notify { .. } => unreachable!("notifications go through deliver"),
                },
            )
            .await;
        crash::point("effect.after");
        let now = provider.now();
        let provider_name = provider.describe();
        let (kind, kept) = match outcome {
            Ok(Outcome::Done { changes, record }) => {
                let kind = match pending.effect {
                    Effect::CaptureBaseline => EventKind::BaselineCaptured { effect: pending.id },
                    _ => EventKind::Reconciled {
                        effect: pending.id,
                        changes,
                    },
                };
                (kind, Some(record))
            }
            Ok(Outcome::Drifted { changes }) => (
                EventKind::DriftDetected {
                    effect: Some(pending.id),
                    changes,
                },
                None,
            ),
            Ok(Outcome::Held { request, record }) => (
                EventKind::TenantApprovalPending {
                    effect: pending.id,
                    request,
                },
                Some(record),
            ),
            Err(err) => (
                EventKind::ProviderFailed {
                    effect: Some(pending.id),
                    error: err.message,
                },
                None,
            ),
        };
        let event = Event {
            kind,
            trigger: Trigger::new(
                TriggerSource::Provider,
                &provider_name,
                format!("effect {} ({})", pending.id, pending.effect.name()),
            ),
        };
        self.apply(loaded, event, now, kept.as_ref())
    }

    /// A deliberate bug for the crash harness's self-test: records a change as made before
    /// making it, so a crash in between skips it.
    async fn confirm_then_act(
        &self,
        loaded: &mut Loaded,
        pending: &PendingEffect,
        provider: &mut dyn Provider,
        target: &crate::domain::plan::PolicyTarget,
        provider_record: Option<&serde_json::Value>,
    ) -> Result<Option<EventRecord>, EngineError> {
        let Effect::Reconcile { desired, .. } = &pending.effect else {
            unreachable!("only reconciles are mutated");
        };
        let event = Event {
            kind: EventKind::Reconciled {
                effect: pending.id,
                changes: 0,
            },
            trigger: Trigger::new(
                TriggerSource::Provider,
                "mutation",
                "confirmed before acting",
            ),
        };
        let record = self.apply(loaded, event, provider.now(), None)?;
        crash::point("effect.before");
        let _ = provider
            .reconcile(
                target,
                desired,
                None,
                provider_record.expect("reconciles have a baseline"),
            )
            .await;
        Ok(record)
    }

    async fn observe(
        &self,
        loaded: &mut Loaded,
        phases: &[String],
        provider: &mut dyn Provider,
    ) -> Result<Option<EventRecord>, EngineError> {
        let plan = &loaded.plan;
        let scopes: Vec<PhaseScope> = phases
            .iter()
            .filter_map(|id| plan.phase_index(id))
            .map(|idx| PhaseScope {
                phase: plan.phases[idx].id.clone(),
                mode: plan.phases[idx].mode,
                include: plan.phases[idx].include.clone(),
                exclude: plan.phases[idx].exclude.clone(),
                exclude_users: plan.emergency_access.users.clone(),
            })
            .collect();
        let target = plan.policy.clone();
        let id = loaded.stored.rollout.id.clone();
        let record = self.store.record(&id)?.unwrap_or(serde_json::Value::Null);
        let jitter_seed = loaded.stored.rollout.last_seq;
        let observation = retrying(self.retry, jitter_seed, "observe", async || {
            provider.observe(&target, &scopes, &record).await
        })
        .await;
        let now = provider.now();
        let kind = match observation {
            Ok(observation) if !observation.drift.is_empty() => EventKind::DriftDetected {
                effect: None,
                changes: observation.drift,
            },
            Ok(observation) => {
                let observations = scopes
                    .iter()
                    .zip(observation.scopes)
                    .map(|(scope, platforms)| {
                        let idx = plan
                            .phase_index(&scope.phase)
                            .expect("scopes come from the plan");
                        let stale_after = plan.phases[idx].gate.stale_after;
                        let by_platform: Vec<_> = platforms
                            .iter()
                            .map(|(platform, reports)| {
                                (*platform, gate::tally(reports, stale_after, now))
                            })
                            .collect();
                        let tally = by_platform
                            .iter()
                            .fold(gate::Tally::default(), |sum, (_, t)| sum.plus(t));
                        PhaseObservation {
                            phase: scope.phase.clone(),
                            at: now,
                            tally,
                            by_platform: if by_platform.len() > 1 {
                                by_platform
                            } else {
                                Vec::new()
                            },
                        }
                    })
                    .collect();
                EventKind::Observed { observations }
            }
            Err(err) => EventKind::ProviderFailed {
                effect: None,
                error: format!("observing {}: {}", phases.join(", "), err.message),
            },
        };
        let event = Event {
            kind,
            trigger: Trigger::new(TriggerSource::Schedule, &self.actor, "observation due"),
        };
        self.apply(loaded, event, now, None)
    }
}

/// Whether a pending configuration effect may be carried out now: never while the rollout failed
/// or drifted (a person decides first), and a held one is asked about once per drive.
fn may_carry_out(
    rollout: &Rollout,
    pending: &PendingEffect,
    asked: &std::collections::BTreeSet<crate::domain::event::EffectId>,
) -> bool {
    !matches!(
        rollout.status,
        RolloutStatus::Failed | RolloutStatus::Drifted
    ) && rollout.drift.is_empty()
        && !asked.contains(&pending.id)
}

/// The rollout cannot move on without a person, or is done.
pub fn should_stop(rollout: &Rollout) -> bool {
    use RolloutStatus::*;
    match rollout.status {
        Running | RollingBack | Aborting => false,
        Held => rollout.phases.iter().any(|p| p.hold_expired),
        Pending
        | WaitingApproval
        | Paused
        | RolledBack
        | Rejected
        | Aborted
        | Completed
        | Failed
        | Drifted
        | WaitingTenantApproval => true,
    }
}

async fn retrying<T>(
    policy: RetryPolicy,
    jitter_seed: u64,
    what: &str,
    mut call: impl AsyncFnMut() -> Result<T, ProviderError>,
) -> Result<T, ProviderError> {
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(err) if err.retryable() && attempt + 1 < policy.attempts => {
                let delay =
                    policy.delay(attempt, err.retry_after, jitter_seed ^ u64::from(attempt));
                tracing::warn!(what, attempt = attempt + 1, ?delay, error = %err, "provider call failed; retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

fn event_record(
    before: &Rollout,
    transition: &machine::Transition,
    event: Event,
    now: Timestamp,
) -> EventRecord {
    EventRecord {
        seq: 0,
        at: now,
        recorded_at: wall_clock(),
        event,
        previous_status: before.status,
        status: transition.rollout.status,
        reason: transition.rollout.reason.clone(),
        notes: transition.notes.clone(),
        effects: transition.effects.clone(),
        prev_hash: String::new(),
        hash: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::plan;

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let policy = RetryPolicy::default();
        let first = policy.delay(0, None, 1);
        let later = policy.delay(4, None, 1);
        assert!(first < later);
        assert!(policy.delay(30, None, 1) <= policy.max_delay);
        assert_eq!(
            policy.delay(0, Some(Duration::from_millis(2500)), 1),
            Duration::from_millis(2500)
        );
    }

    /// A backend on a real (here: hand-moved) clock whose every device fails the policy.
    struct RealClock {
        now: Timestamp,
    }

    #[async_trait::async_trait]
    impl Provider for RealClock {
        fn describe(&self) -> String {
            "real clock".into()
        }
        fn now(&self) -> Timestamp {
            self.now
        }
        fn is_virtual(&self) -> bool {
            false
        }
        async fn advance_to(&mut self, _: Timestamp) -> Result<(), ProviderError> {
            Err(ProviderError::permanent("real time cannot jump"))
        }
        async fn preflight(
            &mut self,
            _: &Plan,
        ) -> Result<crate::provider::Preflight, ProviderError> {
            Ok(crate::provider::Preflight::default())
        }
        async fn capture_baseline(
            &mut self,
            _: &crate::domain::plan::PolicyTarget,
        ) -> Result<serde_json::Value, ProviderError> {
            Ok(serde_json::json!({}))
        }
        async fn reconcile(
            &mut self,
            _: &crate::domain::plan::PolicyTarget,
            _: &crate::domain::desired::DesiredState,
            _: Option<crate::domain::event::DriftResolution>,
            record: &serde_json::Value,
        ) -> Result<Outcome, ProviderError> {
            Ok(Outcome::Done {
                changes: 1,
                record: record.clone(),
            })
        }
        async fn restore(
            &mut self,
            _: &crate::domain::plan::PolicyTarget,
            record: &serde_json::Value,
        ) -> Result<Outcome, ProviderError> {
            Ok(Outcome::Done {
                changes: 1,
                record: record.clone(),
            })
        }
        async fn observe(
            &mut self,
            _: &crate::domain::plan::PolicyTarget,
            scopes: &[PhaseScope],
            _: &serde_json::Value,
        ) -> Result<crate::provider::Observation, ProviderError> {
            let failing = crate::domain::gate::DeviceReport {
                state: crate::domain::gate::DeviceState::Noncompliant,
                last_reported: Some(self.now),
                blocked: false,
                grace_until: None,
            };
            Ok(crate::provider::Observation {
                scopes: scopes
                    .iter()
                    .map(|_| vec![(crate::domain::plan::Platform::Windows, vec![failing; 10])])
                    .collect(),
                drift: Vec::new(),
            })
        }
    }

    #[tokio::test]
    async fn a_deadline_that_passed_on_a_real_clock_is_acted_on_not_spun_on() {
        let text = r#"
[rollout]
name = "real"
observe_every = "6h"
[policy]
compliance = "Baseline"
platform = "windows"
[provider]
kind = "simulator"
[[phase]]
id = "only"
mode = "report"
include = ["All Users"]
min_soak = "1d"
[phase.gate]
max_noncompliant_ratio = "1%"
max_hold = "1h"
"#;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::store::DEFAULT_LOCK_WAIT).unwrap();
        let plan = plan::parse("real.toml", text).unwrap();
        let engine = Engine {
            store: &store,
            notifier: crate::notifier::shared(),
            actor: "test".into(),
            retry: RetryPolicy::default(),
        };
        let mut provider = RealClock {
            now: Timestamp::from_millis(1_800_000_000_000),
        };
        let record = PlanRecord {
            path: "real.toml".into(),
            source: text.into(),
            hash: plan.hash.clone(),
        };
        engine
            .start(&plan, record, "real-1", "alice", &mut provider)
            .await
            .unwrap();
        let mut quiet = |_: &Plan, _: &Rollout, _: &EventRecord| {};
        let first = engine
            .drive("real-1", &mut provider, Pace::Continuous, &mut quiet)
            .await
            .unwrap();
        assert!(matches!(first, DriveOutcome::Wait(_)), "{first:?}");
        // The soak ends; the gate fails and holds, with max_hold an hour away.
        provider.now = provider.now.plus(Duration::from_secs(86_400));
        let held = engine
            .drive("real-1", &mut provider, Pace::Continuous, &mut quiet)
            .await
            .unwrap();
        assert_eq!(held, DriveOutcome::Wait(Duration::from_secs(3600)));
        // Two hours later the hold deadline has passed without anyone ticking at it.
        provider.now = provider.now.plus(Duration::from_secs(7200));
        let stopped = engine
            .drive("real-1", &mut provider, Pace::Continuous, &mut quiet)
            .await
            .unwrap();
        assert_eq!(stopped, DriveOutcome::Stopped(RolloutStatus::Held));
        let rollout = store.rollout("real-1").unwrap().rollout;
        assert!(rollout.phases[0].hold_expired);
    }

    #[test]
    fn jitter_is_deterministic() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay(2, None, 42), policy.delay(2, None, 42));
    }
}
