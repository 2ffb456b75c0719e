//! The imperative shell around the state machine: load, step, commit, act.
//!
//! Every change to a rollout goes through [`Engine::apply`]: the pure machine computes the next
//! rollout and its effects, the store commits and flushes them with the event, and only then does
//! [`Engine::drive`] carry out the effects through the provider. Each effect's outcome comes back
//! as another event. A process killed at any point resumes from the store: committed effects that
//! were not confirmed are still pending and are carried out again, and since providers reconcile
//! (read, compare, write the difference) doing one twice changes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use thiserror::Error;

use crate::crash;
use crate::domain::event::{Effect, Event, EventKind, PendingEffect, Trigger, TriggerSource};
use crate::domain::gate;
use crate::domain::machine::{self, Rejection};
use crate::domain::plan::{self, Plan, PlanErrors};
use crate::domain::rollout::{PhaseObservation, Rollout, RolloutStatus};
use crate::domain::signins::{self, SignIns};
use crate::domain::time::Timestamp;
use crate::notifier::{Delivery, Notifier};
use crate::provider::{Outcome, PhaseScope, Provider, ProviderError, SignInQuery};
use crate::retry::Backoff;
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
    /// How patiently a webhook receiver is retried within one delivery.
    pub delivery: Backoff,
    pub limits: Limits,
}

pub fn load(store: &Store, id: &str) -> Result<Loaded, EngineError> {
    load_stored(store, store.rollout(id)?)
}

/// [`load`] for a rollout record just read (a listing): its plan, checked against it.
pub fn load_stored(store: &Store, stored: StoredRollout) -> Result<Loaded, EngineError> {
    let id = stored.rollout.id.as_str();
    let plan_record = store.plan(id, &stored.rollout.plan_hash)?;
    let plan = stored_plan(&plan_record).map_err(EngineError::Plan)?;
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

/// Whether the file a rollout's plan came from now holds another plan than `running` (the hash
/// of the plan the rollout runs). An unreadable file is no change: the stored plan runs on.
pub fn plan_file_changed(record: &PlanRecord, running: &str) -> bool {
    std::fs::read_to_string(&record.path).is_ok_and(|source| plan::hash_source(&source) != running)
}

/// Plans kept by the store, parsed once per process: a stored plan's text never changes under its
/// hash, and many rollouts (and every API read of one) share a plan. Bounded; a plan whose text
/// does not hash to its record's hash is never kept.
fn stored_plan(record: &PlanRecord) -> Result<Plan, crate::domain::plan::PlanErrors> {
    const KEPT: usize = 4096;
    static PARSED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Plan>>> =
        std::sync::OnceLock::new();
    let parsed = PARSED.get_or_init(Default::default);
    let cached = parsed
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&record.hash)
        .cloned();
    if let Some(plan) = cached {
        return Ok(plan);
    }
    // Checked whole (its adapters' settings too) when its rollout started, and unchanged since
    // (its hash): the domain's reading is all a load needs, and what the plan warns about does
    // not stop it loading. Adapters read their settings again when they connect.
    let plan = plan::check(&record.path, &record.source, plan::Strictness::Lenient)?;
    if plan.hash == record.hash {
        let mut parsed = parsed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if parsed.len() >= KEPT {
            parsed.clear();
        }
        parsed.insert(record.hash.clone(), plan.clone());
    }
    Ok(plan)
}

fn wall_clock() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

impl Engine<'_> {
    /// Creates and starts a rollout (its effects run on the next `drive`). Returns the first
    /// event and the warnings — the plan's (`FILE:LINE:COL: message; why`), then the
    /// preflight's — which are also recorded with it.
    pub async fn start(
        &self,
        plan: &Plan,
        plan_record: PlanRecord,
        id: &str,
        by: &str,
        provider: &mut dyn Provider,
    ) -> Result<(EventRecord, Vec<String>), EngineError> {
        self.start_because(plan, plan_record, id, by, "rollout started", provider)
            .await
    }

    /// [`start`](Self::start), with the start event's reason as the audit trail records it (a
    /// start that skipped the readiness preflight says so, and why).
    pub async fn start_because(
        &self,
        plan: &Plan,
        plan_record: PlanRecord,
        id: &str,
        by: &str,
        reason: &str,
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
            trigger: Trigger::user(by, reason),
        };
        let mut transition = machine::step(plan, &rollout, &event, now)?;
        let mut warnings = plan
            .warnings_in(&plan_record.path, &plan_record.source)
            .lines();
        warnings.extend(preflight.warnings);
        transition
            .notes
            .extend(warnings.iter().map(|w| format!("warning: {w}")));
        let record = event_record(&rollout, &transition, event, now);
        let record = self.store.create(
            &transition.rollout,
            record,
            &plan_record,
            &preflight.resources,
        )?;
        Ok((record, warnings))
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
        // An outcome that changes nothing is not recorded — unless it brings the provider's new
        // record (a superseded change that landed): the record must match the backend.
        if transition.rollout == loaded.stored.rollout && provider_record.is_none() {
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

    /// A person's command on a rollout (approve, pause, rollback, ...), recorded without any
    /// call to the backend: `now` is the backend's last known time.
    pub fn submit(
        &self,
        id: &str,
        kind: EventKind,
        by: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<Option<EventRecord>, EngineError> {
        let mut loaded = load(self.store, id)?;
        self.command(&mut loaded, kind, by, reason, now)
    }

    /// Applies a person's command to a loaded rollout.
    pub fn command(
        &self,
        loaded: &mut Loaded,
        kind: EventKind,
        by: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<Option<EventRecord>, EngineError> {
        let id = loaded.stored.rollout.id.clone();
        let reopens = matches!(
            kind,
            EventKind::RollbackRequested { .. } | EventKind::AbortRequested
        ) && loaded.stored.rollout.status == RolloutStatus::Completed;
        if reopens
            && let Some((other, resource)) = self.store.claimant(&self.store.claims(&id)?, &id)?
        {
            return Err(EngineError::Claimed(format!(
                "rollout `{other}` now drives {resource}; `{id}` completed and can no longer change it"
            )));
        }
        let event = Event {
            kind,
            trigger: Trigger::user(by, reason),
        };
        let now = now.max(loaded.stored.rollout.updated_at);
        self.apply(loaded, event, now, None)
    }

    /// Picks up a changed plan file; errors leave the rollout untouched.
    pub fn notice_plan_change(
        &self,
        loaded: &mut Loaded,
        now: Timestamp,
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
        let new_plan = crate::adapters::parse_plan(&path, &source).map_err(EngineError::Plan)?;
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
        match self.apply(loaded, event, now, None) {
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

    /// Drives one rollout as far as `pace` allows, one piece of work after another.
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
            self.notice_plan_change(&mut loaded, provider.now(), observer)?;
        }
        let mut skip = Skips::default();
        let mut budget = Budget::new(self.limits.steps_per_drive);
        loop {
            budget.spend()?;
            let now = provider.now();
            let work = self.next_work(&loaded, now, &skip);
            let task = match work {
                Work::Stop(status) => return Ok(DriveOutcome::Stopped(status)),
                Work::Wait(at) if pace == Pace::Once || !provider.is_virtual() => {
                    return Ok(DriveOutcome::Wait(provider.real_time_until(at)));
                }
                Work::Wait(at) => {
                    provider.advance_to(at).await?;
                    crash::point("clock.advanced");
                    continue;
                }
                Work::Tick(at) => {
                    match self.tick(&mut loaded, at.max(now))? {
                        Some(record) => observer(&loaded.plan, &loaded.stored.rollout, &record),
                        None => {
                            // A deadline that has passed and changes nothing would spin.
                            tracing::warn!(%at, "a past deadline changed nothing; waiting");
                            return Ok(DriveOutcome::Wait(self.limits.idle_wait));
                        }
                    }
                    continue;
                }
                work => self.task(&loaded, work)?,
            };
            if self
                .confirm_before_acting(&mut loaded, &task, provider.now())?
                .0
            {
                let _ = task.perform(provider, self.notifier).await;
                continue;
            }
            let finished = task.perform(provider, self.notifier).await;
            skip.note(&finished);
            if let Some(record) = self.conclude(&mut loaded, finished)? {
                observer(&loaded.plan, &loaded.stored.rollout, &record);
            }
        }
    }

    /// What the rollout needs next, from its record and the backend's clock. Pure: it decides,
    /// [`Task::perform`] does the I/O, [`Engine::conclude`] records the outcome.
    pub fn next_work(&self, loaded: &Loaded, now: Timestamp, skip: &Skips) -> Work {
        let rollout = &loaded.stored.rollout;
        let configuration = rollout
            .pending
            .iter()
            .find(|p| !p.effect.is_notification())
            .filter(|p| may_carry_out(rollout, p, &skip.asked));
        if let Some(pending) = configuration {
            return Work::Effect(pending.clone());
        }
        let notification = rollout
            .pending
            .iter()
            .find(|p| p.effect.is_notification() && !skip.undeliverable.contains(&p.id));
        if let Some(pending) = notification {
            return Work::Deliver(pending.clone());
        }
        if should_stop(rollout) {
            return Work::Stop(rollout.status);
        }
        let agenda = machine::agenda(&loaded.plan, rollout, now);
        if !agenda.observe.is_empty() {
            return Work::Observe(agenda.observe);
        }
        match agenda.wake_at {
            None => Work::Stop(rollout.status),
            Some(at) if at > now => Work::Wait(at),
            Some(at) => Work::Tick(at),
        }
    }

    /// The owned inputs of a piece of work, so it can run while the rollout takes commands.
    pub fn task(&self, loaded: &Loaded, work: Work) -> Result<Task, EngineError> {
        let id = loaded.stored.rollout.id.clone();
        let needs_record = match &work {
            Work::Effect(pending) => pending.effect != Effect::CaptureBaseline,
            Work::Observe(_) => true,
            _ => false,
        };
        let record = if needs_record {
            self.store.record(&id)?
        } else {
            None
        };
        if matches!(&work, Work::Effect(p) if p.effect != Effect::CaptureBaseline)
            && record.is_none()
        {
            return Err(EngineError::Invalid(format!(
                "rollout `{id}` has no recorded baseline"
            )));
        }
        let head = match &work {
            Work::Deliver(pending) => Some(self.store.head_at(&id, pending.id.seq)?),
            _ => None,
        };
        Ok(Task {
            work,
            plan: loaded.plan.clone(),
            rollout: id,
            store_id: self.store.id().to_string(),
            head,
            plan_name: loaded.stored.rollout.plan_name.clone(),
            record,
            actor: self.actor.clone(),
            delivery: self.delivery,
            applied_at: loaded
                .stored
                .rollout
                .phases
                .iter()
                .filter_map(|p| Some((p.id.clone(), p.applied_at?)))
                .collect(),
        })
    }

    /// Records what a piece of work found: the event it produced, with the provider's record.
    pub fn conclude(
        &self,
        loaded: &mut Loaded,
        finished: Finished,
    ) -> Result<Option<EventRecord>, EngineError> {
        let Some(event) = finished.event else {
            return Ok(None);
        };
        self.apply(loaded, event, finished.now, finished.record.as_ref())
    }

    /// A deadline came due.
    pub fn tick(
        &self,
        loaded: &mut Loaded,
        at: Timestamp,
    ) -> Result<Option<EventRecord>, EngineError> {
        let tick = Event {
            kind: EventKind::Tick,
            trigger: Trigger::new(TriggerSource::Schedule, &self.actor, "deadline reached"),
        };
        self.apply(loaded, tick, at, None)
    }

    /// A deliberate bug for the crash harness's self-test: records a change as made before
    /// making it, so a crash in between skips it.
    /// The `confirm-before-act` mutation, for the crash harness's self-test: commits a
    /// configuration effect's success before carrying it out (the bug the harness must catch).
    /// Says whether it fired; the caller then carries the task out and drops its outcome.
    pub fn confirm_before_acting(
        &self,
        loaded: &mut Loaded,
        task: &Task,
        now: Timestamp,
    ) -> Result<(bool, Option<EventRecord>), EngineError> {
        let Work::Effect(pending) = &task.work else {
            return Ok((false, None));
        };
        if !matches!(pending.effect, Effect::Reconcile { .. })
            || !crash::mutation("confirm-before-act")
        {
            return Ok((false, None));
        }
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
        let record = self.apply(loaded, event, now, None)?;
        crash::point("effect.before");
        Ok((true, record))
    }
}

/// What a rollout needs done next.
#[derive(Clone, Debug, PartialEq)]
pub enum Work {
    /// Carry out a pending configuration effect.
    Effect(PendingEffect),
    /// Deliver a pending notification.
    Deliver(PendingEffect),
    /// Observe these phases.
    Observe(Vec<String>),
    /// Nothing to do until this moment of the backend's clock.
    Wait(Timestamp),
    /// A deadline has come.
    Tick(Timestamp),
    /// Nothing more without a person (or the rollout is finished).
    Stop(RolloutStatus),
}

/// What one drive (or one runner) leaves alone until later: notifications whose receiver is
/// down, and held effects already asked about.
#[derive(Clone, Debug, Default)]
pub struct Skips {
    pub undeliverable: std::collections::BTreeSet<crate::domain::event::EffectId>,
    pub asked: std::collections::BTreeSet<crate::domain::event::EffectId>,
}

impl Skips {
    pub fn note(&mut self, finished: &Finished) {
        if let Some(id) = finished.undeliverable {
            self.undeliverable.insert(id);
        }
        if let Some(id) = finished.asked {
            self.asked.insert(id);
        }
    }
}

/// Bounds the steps one drive may take, so no loop can spin.
struct Budget {
    left: u32,
}

impl Budget {
    fn new(steps: u32) -> Budget {
        Budget { left: steps }
    }

    fn spend(&mut self) -> Result<(), EngineError> {
        if self.left == 0 {
            return Err(EngineError::Invalid(
                "the rollout took more steps than one drive allows; stopping (this is a bug)"
                    .into(),
            ));
        }
        self.left -= 1;
        Ok(())
    }
}

/// The limits one process works within.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Steps one drive of one rollout may take.
    pub steps_per_drive: u32,
    /// How long to wait after a deadline that changed nothing.
    pub idle_wait: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            steps_per_drive: 100_000,
            idle_wait: Duration::from_secs(60),
        }
    }
}

/// One piece of work with everything it needs, owned.
pub struct Task {
    pub work: Work,
    plan: Plan,
    rollout: String,
    /// The store's identity, which makes notification keys unique across stores.
    store_id: String,
    /// For a notification, the chain head at the event that committed it (the same on every
    /// attempt): receivers keep it, and it later shows a rewritten trail (`phasegate verify
    /// --against`).
    head: Option<crate::store::ChainHead>,
    plan_name: String,
    record: Option<serde_json::Value>,
    actor: String,
    delivery: Backoff,
    /// When each phase's configuration was confirmed: where its sign-in window may start.
    applied_at: BTreeMap<String, Timestamp>,
}

/// What a piece of work produced: the event to record (none if there is nothing to say) at the
/// backend's time, and the provider's new record.
pub struct Finished {
    pub event: Option<Event>,
    pub now: Timestamp,
    pub record: Option<serde_json::Value>,
    pub undeliverable: Option<crate::domain::event::EffectId>,
    pub asked: Option<crate::domain::event::EffectId>,
    /// How long the I/O took.
    pub took: Duration,
}

impl Task {
    /// Does the I/O of the work. Never records: the outcome comes back as [`Finished`].
    pub async fn perform(self, provider: &mut dyn Provider, notifier: &dyn Notifier) -> Finished {
        let started = std::time::Instant::now();
        let mut finished = match &self.work {
            Work::Effect(pending) => self.carry_out(pending, provider).await,
            Work::Deliver(pending) => self.deliver(pending, provider.now(), notifier).await,
            Work::Observe(phases) => self.observe(phases, provider).await,
            Work::Wait(_) | Work::Tick(_) | Work::Stop(_) => Finished {
                event: None,
                now: provider.now(),
                record: None,
                undeliverable: None,
                asked: None,
                took: Duration::ZERO,
            },
        };
        finished.took = started.elapsed();
        finished
    }

    fn finished(event: Event, now: Timestamp, record: Option<serde_json::Value>) -> Finished {
        Finished {
            event: Some(event),
            now,
            record,
            undeliverable: None,
            asked: None,
            took: Duration::ZERO,
        }
    }

    /// Carries out one pending configuration effect.
    async fn carry_out(&self, pending: &PendingEffect, provider: &mut dyn Provider) -> Finished {
        let target = &self.plan.policy;
        let record = self.record.as_ref();
        crash::point("effect.before");
        let outcome = match &pending.effect {
            Effect::CaptureBaseline => provider
                .capture_baseline(target)
                .await
                .map(|record| Outcome::Done { changes: 0, record }),
            Effect::Reconcile {
                desired,
                resolution,
            } => {
                provider
                    .reconcile(target, desired, *resolution, record.expect("loaded"))
                    .await
            }
            Effect::RestoreBaseline => provider.restore(target, record.expect("loaded")).await,
            Effect::Notify { .. } => unreachable!("notifications go through deliver"),
        };
        crash::point("effect.after");
        let now = provider.now();
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
        let held = matches!(kind, EventKind::TenantApprovalPending { .. });
        let event = Event {
            kind,
            trigger: Trigger::new(
                TriggerSource::Provider,
                &provider.describe(),
                format!("effect {} ({})", pending.id, pending.effect.name()),
            ),
        };
        let mut finished = Task::finished(event, now, kept);
        if held {
            finished.asked = Some(pending.id);
        }
        finished
    }

    /// Delivers one outbox notification (with a few attempts) and records the delivery. A
    /// receiver that cannot be reached leaves it pending for later.
    async fn deliver(
        &self,
        pending: &PendingEffect,
        now: Timestamp,
        notifier: &dyn Notifier,
    ) -> Finished {
        let Effect::Notify {
            to,
            status,
            previous,
            reason,
            at,
        } = &pending.effect
        else {
            unreachable!("only notifications are delivered");
        };
        // Unique across stores: two stores' rollouts may share an id, never a key.
        let key = format!("{}/{}:{}", self.store_id, self.rollout, pending.id);
        let body = serde_json::json!({
            "idempotencyKey": key,
            "rollout": self.rollout,
            "plan": self.plan_name,
            "status": status.as_str(),
            "previousStatus": previous.as_str(),
            "reason": reason,
            "at": at.rfc3339(),
            "chainHead": self.head,
        });
        let delivery = Delivery {
            key: &key,
            to,
            body: serde_json::to_vec(&body).expect("json serializes"),
        };
        crash::point("delivery.before");
        let mut failed = 0;
        let mut patience = self.delivery.patience();
        let status = loop {
            let e = match notifier.deliver(&delivery).await {
                Ok(status) => break status,
                Err(e) => e,
            };
            failed += 1;
            let seed = pending.id.seq ^ u64::from(failed);
            let again = e
                .failure
                .and_then(|failure| self.delivery.wait(failed, failure, e.retry_after, seed))
                .filter(|&delay| patience.spend(delay));
            let Some(delay) = again else {
                tracing::warn!(effect = %pending.id, error = %e, "notification not delivered; it stays pending");
                return Finished {
                    event: None,
                    now,
                    record: None,
                    undeliverable: Some(pending.id),
                    asked: None,
                    took: Duration::ZERO,
                };
            };
            tracing::warn!(error = %e, ?delay, "notification not delivered yet; retrying");
            tokio::time::sleep(delay).await;
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
                format!("{} answered {status}", crate::notifier::describe(to)),
            ),
        };
        Task::finished(event, now, None)
    }

    /// Reads the sign-in log for the phases whose gate or rollback criteria need it (and only
    /// then: the log is rate-limited). A log that cannot be read is "not available" for each of
    /// them, with the reason; the plan's `signin_data` decides what the gate does with that.
    async fn observe_signins(
        &self,
        scopes: &[PhaseScope],
        record: &serde_json::Value,
        now: Timestamp,
        provider: &mut dyn Provider,
    ) -> BTreeMap<String, SignIns> {
        let plan = &self.plan;
        let queries: Vec<SignInQuery> = scopes
            .iter()
            .filter_map(|scope| {
                let phase = &plan.phases[plan.phase_index(&scope.phase)?];
                signins::wanted(&phase.gate, &phase.rollback_when).then(|| SignInQuery {
                    scope: scope.clone(),
                    since: signins::window(
                        self.applied_at.get(&scope.phase).copied(),
                        phase.gate.signin_window,
                        now,
                    ),
                    until: now,
                })
            })
            .collect();
        if queries.is_empty() {
            return BTreeMap::new();
        }
        let answers = match provider
            .observe_signins(&plan.policy, &queries, record)
            .await
        {
            Ok(answers) if answers.len() == queries.len() => answers,
            Ok(_) => {
                let reason = "the provider answered for other phases than asked".to_string();
                queries
                    .iter()
                    .map(|_| SignIns::Unavailable {
                        reason: reason.clone(),
                    })
                    .collect()
            }
            Err(err) => queries
                .iter()
                .map(|_| SignIns::Unavailable {
                    reason: format!("reading the sign-in log failed: {}", err.message),
                })
                .collect(),
        };
        queries
            .into_iter()
            .map(|q| q.scope.phase)
            .zip(answers)
            .collect()
    }

    async fn observe(&self, phases: &[String], provider: &mut dyn Provider) -> Finished {
        let plan = &self.plan;
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
        let record = self.record.clone().unwrap_or(serde_json::Value::Null);
        let observation = provider.observe(&plan.policy, &scopes, &record).await;
        let now = provider.now();
        // The sign-in log is read only for an observation that will be recorded as one (not
        // after a failure or drift): its requests are rate-limited.
        let mut signins = match &observation {
            Ok(seen) if seen.drift.is_empty() => {
                self.observe_signins(&scopes, &record, now, provider).await
            }
            _ => BTreeMap::new(),
        };
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
                            signins: signins.remove(&scope.phase),
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
        Task::finished(event, now, None)
    }
}

/// Whether a pending configuration effect may be carried out now: never while the rollout is
/// paused (a pause stops every change to the tenant until `resume`), failed or drifted (a person
/// decides first), and a held one is asked about once per drive.
fn may_carry_out(
    rollout: &Rollout,
    pending: &PendingEffect,
    asked: &std::collections::BTreeSet<crate::domain::event::EffectId>,
) -> bool {
    !matches!(
        rollout.status,
        RolloutStatus::Paused | RolloutStatus::Failed | RolloutStatus::Drifted
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
            delivery: Backoff::WEBHOOK,
            limits: crate::engine::Limits::default(),
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
}
