//! The imperative shell around the state machine: load, step, commit, act.
//!
//! Every change to a rollout goes through [`Engine::apply`]: the pure machine computes the next
//! rollout and its effects, the store commits and flushes them with the event, and only then does
//! [`Engine::drive`] carry out the effects through the provider. Each effect's outcome comes back
//! as another event. A process killed at any point resumes from the store: committed effects that
//! were not confirmed are still pending and are carried out again, and since providers reconcile
//! (read, compare, write the difference) doing one twice changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::crash;
use crate::domain::event::{Effect, Event, EventKind, PendingEffect, Trigger, TriggerSource};
use crate::domain::machine::{self, Rejection};
use crate::domain::plan::{self, Plan, PlanErrors};
use crate::domain::rollout::{PhaseObservation, Rollout, RolloutStatus};
use crate::domain::signins::{self, SignIns};
use crate::domain::time::Timestamp;
use crate::domain::{directory, forecast, gate};
use crate::notifier::{Delivery, Notifier};
use crate::provider::{ErrorKind, Outcome, PhaseScope, Provider, ProviderError, SignInQuery};
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
    /// Nothing was done, for a passing reason (the rollout's driver was just ending, the
    /// database could not be reached): the same request may simply be sent again.
    #[error("{0}")]
    Unavailable(String),
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

/// A rollout loaded with the plan it runs. The plan is shared (the store's plans are parsed once
/// per process, and every piece of work carries the plan it was decided on): a load or a task
/// costs a reference, not a copy of the plan.
pub struct Loaded {
    pub stored: StoredRollout,
    pub plan: Arc<Plan>,
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

/// Whether the rollout's plan file needs a look from its actor: it holds another plan than
/// `running` (the hash of the plan the rollout runs), other than the one `recorded` as changed
/// outside phasegate or the one `waiting` for approval; or it holds `running` again while a
/// change is recorded. An unreadable file is no change: the stored plan runs on.
pub fn plan_file_differs(
    record: &PlanRecord,
    running: &str,
    recorded: Option<&str>,
    waiting: Option<&str>,
) -> bool {
    file_differs(
        plan_file_hash(&record.path).as_deref(),
        running,
        recorded,
        waiting,
    )
}

/// [`plan_file_differs`], given the hash of what the file holds now (`None`: unreadable).
fn file_differs(
    now: Option<&str>,
    running: &str,
    recorded: Option<&str>,
    waiting: Option<&str>,
) -> bool {
    now.is_some_and(|hash| {
        if hash == running {
            recorded.is_some()
        } else {
            recorded != Some(hash) && waiting != Some(hash)
        }
    })
}

/// Whether the actor of `rollout` has a plan to look at: an approved change to adopt, or a plan
/// file that changed (see [`plan_file_differs`]).
pub fn plan_file_changed(record: &PlanRecord, rollout: &Rollout) -> bool {
    changed_given(plan_file_hash(&record.path).as_deref(), rollout)
}

/// [`plan_file_changed`], given the hash of what the file holds now.
fn changed_given(now: Option<&str>, rollout: &Rollout) -> bool {
    rollout.plan_change.as_ref().is_some_and(|c| c.approved)
        || file_differs(
            now,
            &rollout.plan_hash,
            rollout.plan_file.as_ref().map(|f| f.plan_hash.as_str()),
            rollout.plan_change.as_ref().map(|c| c.plan_hash.as_str()),
        )
}

/// The hash of the plan a file holds now, `None` if it cannot be read.
fn plan_file_hash(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|source| plan::hash_source(&source))
}

/// [`plan_file_changed`] and [`plan_file_differs`] for many rollouts at once (a resume): each
/// file is read once, however many rollouts run a plan from it. A file edited during the pass is
/// seen as it was when first read, as if the pass had looked at every rollout in that instant.
#[derive(Default)]
pub struct PlanFiles {
    read: std::sync::Mutex<std::collections::HashMap<String, Option<String>>>,
}

impl PlanFiles {
    pub fn changed(&self, record: &PlanRecord, rollout: &Rollout) -> bool {
        changed_given(self.hash(&record.path).as_deref(), rollout)
    }

    pub fn differs(
        &self,
        record: &PlanRecord,
        running: &str,
        recorded: Option<&str>,
        waiting: Option<&str>,
    ) -> bool {
        file_differs(
            self.hash(&record.path).as_deref(),
            running,
            recorded,
            waiting,
        )
    }

    fn hash(&self, path: &str) -> Option<String> {
        let known = self
            .read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(path)
            .cloned();
        known.unwrap_or_else(|| {
            let now = plan_file_hash(path);
            self.read
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(path.to_string(), now.clone());
            now
        })
    }
}

/// Plans kept by the store, parsed once per process: a stored plan's text never changes under its
/// hash, and many rollouts (and every API read of one) share a plan. Bounded; a plan whose text
/// does not hash to its record's hash is never kept. The plans are shared, not copied: a cache
/// hit and a rollout loaded cost a reference, and the plans let go when the cache is full are
/// dropped outside its lock (by their last holder), so a loader never waits on another's drop.
fn stored_plan(record: &PlanRecord) -> Result<Arc<Plan>, crate::domain::plan::PlanErrors> {
    const KEPT: usize = 4096;
    type Parsed = std::sync::Mutex<std::collections::HashMap<String, Arc<Plan>>>;
    static PARSED: std::sync::OnceLock<Parsed> = std::sync::OnceLock::new();
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
    let plan = Arc::new(plan::check(
        &record.path,
        &record.source,
        plan::Strictness::Lenient,
    )?);
    if plan.hash == record.hash {
        let evicted = {
            let mut parsed = parsed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let evicted = (parsed.len() >= KEPT).then(|| std::mem::take(&mut *parsed));
            parsed.insert(record.hash.clone(), plan.clone());
            evicted
        };
        drop(evicted);
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
            matches!(event.kind, EventKind::PlanChanged { .. }).then(|| loaded.plan_record.clone());
        self.commit_transition(
            loaded,
            transition,
            event,
            now,
            provider_record,
            plan_record.as_ref(),
        )
    }

    /// Commits a transition with what is attached to it (a plan's text, the provider's record).
    fn commit_transition(
        &self,
        loaded: &mut Loaded,
        transition: machine::Transition,
        event: Event,
        now: Timestamp,
        provider_record: Option<&serde_json::Value>,
        plan_record: Option<&PlanRecord>,
    ) -> Result<Option<EventRecord>, EngineError> {
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
        let approves_plan = matches!(kind, EventKind::PlanChangeApproved { .. });
        let approval = match &kind {
            EventKind::ApprovalGranted { phase, ticket, .. } => {
                Some((phase.clone(), ticket.clone()))
            }
            _ => None,
        };
        let event = Event {
            kind,
            trigger: Trigger::user(by, reason),
        };
        let now = now.max(loaded.stored.rollout.updated_at);
        let record = match (self.apply(loaded, event, now, None), approval) {
            (Err(EngineError::Rejected(why)), Some((phase, ticket))) => {
                self.record_refusal(loaded, phase, ticket, &why, by, reason, now)?;
                return Err(EngineError::Rejected(why));
            }
            (result, _) => result?,
        };
        if approves_plan && let Some(adopted) = self.adopt_approved_plan(loaded, now)? {
            return Ok(Some(adopted));
        }
        Ok(record)
    }

    /// Records that an approval was refused, and why, so the audit trail holds every attempt: the
    /// refusal changes nothing but the trail. An attempt with no identity names nobody to record.
    #[allow(clippy::too_many_arguments)]
    fn record_refusal(
        &self,
        loaded: &mut Loaded,
        phase: String,
        ticket: Option<String>,
        why: &Rejection,
        by: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        if by.trim().is_empty() {
            return Ok(());
        }
        let event = Event {
            kind: EventKind::ApprovalRefused {
                phase,
                ticket,
                why: why.to_string(),
            },
            trigger: Trigger::user(by, reason),
        };
        let transition = machine::step(&loaded.plan, &loaded.stored.rollout, &event, now)?;
        self.commit_transition(loaded, transition, event, now, None, None)?;
        Ok(())
    }

    /// A person applies the plan in `source` (read from `path`) to a running rollout. One that
    /// weakens nothing is adopted at once; one that weakens the plan in force waits for approval
    /// under it (`domain::machine::plan_change`). Either way the audit trail names `by`.
    pub fn apply_plan(
        &self,
        loaded: &mut Loaded,
        path: &str,
        source: String,
        by: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<Option<EventRecord>, EngineError> {
        let new_plan = crate::adapters::parse_plan(path, &source).map_err(EngineError::Plan)?;
        let record = PlanRecord {
            path: path.to_string(),
            source,
            hash: new_plan.hash.clone(),
        };
        if record.hash == loaded.stored.rollout.plan_hash {
            return Err(EngineError::Invalid(format!(
                "rollout `{}` already runs this plan",
                loaded.stored.rollout.id
            )));
        }
        let now = now.max(loaded.stored.rollout.updated_at);
        let trigger = Trigger::user(by, reason);
        let adopt = Event {
            kind: EventKind::PlanChanged {
                plan_hash: new_plan.hash.clone(),
            },
            trigger: trigger.clone(),
        };
        // Whether the rollout could run the new plan at all, before anything is recorded.
        let adopted = machine::step(&new_plan, &loaded.stored.rollout, &adopt, now)?;
        let weakens = plan::change::weakenings(&loaded.plan, &new_plan);
        if weakens.is_empty() {
            adopted.rollout.check_invariants(&new_plan).map_err(|e| {
                EngineError::Invalid(format!("refusing an inconsistent transition: {e}"))
            })?;
            let old = std::mem::replace(&mut loaded.plan, Arc::new(new_plan));
            let old_record = std::mem::replace(&mut loaded.plan_record, record);
            let plan_record = loaded.plan_record.clone();
            let result =
                self.commit_transition(loaded, adopted, adopt, now, None, Some(&plan_record));
            if result.is_err() {
                loaded.plan = old;
                loaded.plan_record = old_record;
            }
            return result;
        }
        let event = Event {
            kind: EventKind::PlanChangeProposed {
                plan_hash: new_plan.hash.clone(),
                weakens,
            },
            trigger,
        };
        let transition = machine::step(&loaded.plan, &loaded.stored.rollout, &event, now)?;
        self.commit_transition(loaded, transition, event, now, None, Some(&record))
    }

    /// Adopts the plan change that was approved, if one waits: the plan's text is the store's,
    /// kept when it was applied. Run after an approval, and when a rollout is loaded to drive (a
    /// crash between the approval and the adoption leaves it to do).
    pub fn adopt_approved_plan(
        &self,
        loaded: &mut Loaded,
        now: Timestamp,
    ) -> Result<Option<EventRecord>, EngineError> {
        let Some(change) = loaded
            .stored
            .rollout
            .plan_change
            .clone()
            .filter(|c| c.approved)
        else {
            return Ok(None);
        };
        let id = loaded.stored.rollout.id.clone();
        let record = self.store.plan(&id, &change.plan_hash)?;
        let new_plan = stored_plan(&record).map_err(EngineError::Plan)?;
        let names: Vec<&str> = change.approvals.iter().map(|a| a.by.as_str()).collect();
        let event = Event {
            kind: EventKind::PlanChanged {
                plan_hash: change.plan_hash.clone(),
            },
            trigger: Trigger::new(
                TriggerSource::Internal,
                &self.actor,
                format!(
                    "the plan change applied by {} is approved by {}",
                    change.by,
                    names.join(", ")
                ),
            ),
        };
        let old = std::mem::replace(&mut loaded.plan, new_plan);
        let old_record = std::mem::replace(&mut loaded.plan_record, record);
        let now = now.max(loaded.stored.rollout.updated_at);
        let result = self.apply(loaded, event, now, None);
        if result.is_err() {
            loaded.plan = old;
            loaded.plan_record = old_record;
        }
        result
    }

    /// Looks at the rollout's plan file: one edited behind phasegate's back is recorded (with a
    /// warning in the log and the audit trail) and never adopted; a person applies a plan with
    /// [`Engine::apply_plan`]. Also adopts a plan change that was approved and not yet adopted.
    pub fn notice_plan_change(
        &self,
        loaded: &mut Loaded,
        now: Timestamp,
        observer: Observer<'_>,
    ) -> Result<(), EngineError> {
        if let Some(record) = self.adopt_approved_plan(loaded, now)? {
            observer(&loaded.plan, &loaded.stored.rollout, &record);
        }
        let path = loaded.plan_record.path.clone();
        let Ok(source) = std::fs::read_to_string(&path) else {
            tracing::debug!(%path, "plan file not readable; running the stored plan");
            return Ok(());
        };
        let hash = plan::hash_source(&source);
        let rollout = &loaded.stored.rollout;
        let known = rollout.plan_file.as_ref().map(|f| f.plan_hash.as_str());
        let waiting = rollout.plan_change.as_ref().map(|c| c.plan_hash.as_str());
        if hash == rollout.plan_hash && known.is_none() {
            return Ok(());
        }
        if hash != rollout.plan_hash {
            if known == Some(hash.as_str()) || waiting == Some(hash.as_str()) {
                return Ok(());
            }
            tracing::warn!(
                rollout = %rollout.id,
                %path,
                "the plan file was changed outside phasegate; it is not adopted (apply it with `phasegate plan apply`)"
            );
        }
        let event = Event {
            kind: EventKind::PlanFileChanged {
                plan_hash: hash,
                path: path.clone(),
            },
            trigger: Trigger::new(
                TriggerSource::Internal,
                &self.actor,
                format!("{path} changed"),
            ),
        };
        if let Some(record) = self.apply(loaded, event, now, None)? {
            observer(&loaded.plan, &loaded.stored.rollout, &record);
        }
        Ok(())
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
        // The organisation hears of a change before it is made: an announcement goes out before
        // any configuration effect. One that cannot be delivered now is skipped, so it holds
        // nothing up, and is tried again later.
        let announcement = rollout
            .pending
            .iter()
            .find(|p| p.effect.is_announcement() && !skip.undeliverable.contains(&p.id));
        if let Some(pending) = announcement {
            return Work::Deliver(pending.clone());
        }
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
        // Approvals are judged against the directory as last read: read it now when a phase that
        // asks a directory group is observed again or starts waiting.
        let due = machine::approvers_due(&loaded.plan, rollout);
        if !due.is_empty() {
            return Work::ReadApprovers(due);
        }
        if should_stop(rollout) {
            // A rollout that waits for a person still has its exceptions end at their time.
            if let Some(at) = machine::exception_deadline(rollout)
                && at <= now
            {
                return Work::Tick(at);
            }
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
        let expired = machine::expired_exceptions(&loaded.stored.rollout, at);
        let tick = if expired.is_empty() {
            Event {
                kind: EventKind::Tick,
                trigger: Trigger::new(TriggerSource::Schedule, &self.actor, "deadline reached"),
            }
        } else {
            Event {
                kind: EventKind::ExceptionExpired { names: expired },
                trigger: Trigger::new(TriggerSource::Schedule, &self.actor, "exception ended"),
            }
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

/// Whether a pending notification is an e-mail to groups whose members are not read yet.
pub fn needs_recipients(effect: &Effect) -> bool {
    matches!(effect, Effect::Notify {
        to,
        message: Some(message),
        ..
    } if to.kind() == crate::announce::email::NAME
        && !message.groups.is_empty()
        && message.recipients.is_none())
}

/// Who an e-mail to groups reached, for its delivery's line in the audit trail.
fn told(message: &crate::domain::event::Message) -> String {
    let Some(recipients) = &message.recipients else {
        return String::new();
    };
    let mut text = format!(
        "; to {} address{} and {} member{} of {}",
        message.addresses.len(),
        if message.addresses.len() == 1 {
            ""
        } else {
            "es"
        },
        recipients.addresses.len(),
        if recipients.addresses.len() == 1 {
            ""
        } else {
            "s"
        },
        message.groups.join(", ")
    );
    text.push_str(&format!(" (digest {})", recipients.digest()));
    if !recipients.without_mail.is_empty() {
        text.push_str(&format!(
            "; {} without a mail address, not told: {}",
            recipients.without_mail.len(),
            directory::some_of(&recipients.without_mail, 20)
        ));
    }
    if !recipients.disabled.is_empty() {
        text.push_str(&format!(
            "; {} disabled, not told: {}",
            recipients.disabled.len(),
            directory::some_of(&recipients.disabled, 20)
        ));
    }
    text
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
    /// Read the members of these directory approver groups.
    ReadApprovers(Vec<String>),
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
    /// For each undeliverable notification: how many passes failed, and when to try it again.
    pub retry:
        std::collections::BTreeMap<crate::domain::event::EffectId, (u32, std::time::Instant)>,
}

/// How long an undeliverable notification rests between passes: growing from a couple of
/// seconds to five minutes, so a channel that is down is neither hammered nor forgotten.
pub const OUTBOX_RETRY: Backoff = Backoff {
    attempts: u32::MAX,
    base: Duration::from_secs(2),
    cap: Duration::from_secs(300),
    longest_wait: Duration::from_secs(300),
};

/// How many notifications' passes [`Skips`] remembers before forgetting delivered ones.
const RETRY_KEPT: usize = 1024;

impl Skips {
    pub fn note(&mut self, finished: &Finished) {
        self.note_at(finished, std::time::Instant::now());
    }

    /// [`Skips::note`], at `now` (tests).
    pub fn note_at(&mut self, finished: &Finished, now: std::time::Instant) {
        if let Some(id) = finished.undeliverable {
            self.undeliverable.insert(id);
            if self.retry.len() >= RETRY_KEPT {
                // Forget the passes of notifications that have gone out since.
                let waiting = &self.undeliverable;
                self.retry.retain(|id, _| waiting.contains(id));
            }
            let failures = self.retry.get(&id).map_or(0, |(n, _)| *n).saturating_add(1);
            let rest = OUTBOX_RETRY.step(failures.min(32), id.seq ^ u64::from(id.index));
            self.retry.insert(id, (failures, now + rest));
        }
        if let Some(id) = finished.asked {
            self.asked.insert(id);
        }
    }

    /// Lets the notifications whose rest is over be tried again; answers when the next one's
    /// is (none: nothing is waiting).
    pub fn release(&mut self, now: std::time::Instant) -> Option<std::time::Instant> {
        let mut next = None;
        for (id, (_, at)) in &self.retry {
            if *at <= now {
                self.undeliverable.remove(id);
            } else if self.undeliverable.contains(id) {
                next = Some(next.map_or(*at, |n: std::time::Instant| n.min(*at)));
            }
        }
        next
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
    plan: Arc<Plan>,
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
            Work::Deliver(pending) if needs_recipients(&pending.effect) => {
                self.resolve_recipients(pending, provider).await
            }
            Work::Deliver(pending) => self.deliver(pending, provider.now(), notifier).await,
            Work::Observe(phases) => self.observe(phases, provider).await,
            Work::ReadApprovers(groups) => self.read_approvers(groups, provider).await,
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
                ..
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

    /// Reads the plan's directory approver groups: each group's snapshot, or why it could not
    /// be read (which refuses its approvals until a later read succeeds). Never holds the
    /// rollout up: the answer is recorded either way.
    async fn read_approvers(&self, groups: &[String], provider: &mut dyn Provider) -> Finished {
        let source = provider.describe();
        let mut read = BTreeMap::new();
        for group in groups {
            let Some(directory) = self.plan.directory_approvers.get(group) else {
                continue;
            };
            let answer = provider
                .group_members(
                    &self.plan.policy,
                    directory,
                    directory::APPROVER_MEMBERS_MAX,
                )
                .await;
            let now = provider.now();
            let snapshot = match answer {
                Ok(found) => directory::ApproverSnapshot::read(directory, &source, now, &found),
                Err(e) => {
                    tracing::warn!(group, error = %e, "an approver group could not be read");
                    directory::ApproverSnapshot::unreadable(directory, &source, now, &e.message)
                }
            };
            read.insert(group.clone(), snapshot);
        }
        let event = Event {
            kind: EventKind::ApproversRead { groups: read },
            trigger: Trigger::new(
                TriggerSource::Provider,
                &source,
                "approver groups read from the directory",
            ),
        };
        Task::finished(event, provider.now(), None)
    }

    /// Reads the members of an e-mail announcement's groups from the directory, once, before
    /// its first attempt: the list is recorded (`RecipientsResolved`) and every attempt after,
    /// across restarts, goes to it. A directory that cannot be read now leaves the message
    /// pending, retried like a channel that is down; groups that are not in the directory, or
    /// too large for one message, drop it with an event saying why.
    async fn resolve_recipients(
        &self,
        pending: &PendingEffect,
        provider: &mut dyn Provider,
    ) -> Finished {
        let Effect::Notify {
            to,
            message: Some(message),
            ..
        } = &pending.effect
        else {
            unreachable!("only announcements have recipients to resolve");
        };
        // The channel's own limit, as its outbox record carries it.
        let max = crate::announce::email::of(to)
            .map(|settings| settings.max_recipients)
            .unwrap_or(directory::MAIL_RECIPIENTS_MAX);
        let mut members = Vec::new();
        let mut read = Vec::new();
        let mut failed = None;
        for group in &message.groups {
            let left = directory::MEMBERS_READ_MAX.saturating_sub(members.len());
            match provider.group_members(&self.plan.policy, group, left).await {
                Ok(found) => {
                    read.push(format!("{group}: {}", found.len()));
                    members.extend(found);
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            if members.len() > directory::MEMBERS_READ_MAX {
                break;
            }
        }
        let now = provider.now();
        let trigger =
            |reason: String| Trigger::new(TriggerSource::Provider, &provider.describe(), reason);
        let kind = match failed {
            Some(e) if e.kind == ErrorKind::NotFound => EventKind::NotificationDropped {
                effect: pending.id,
                reason: format!("its groups' members cannot be read: {}", e.message),
            },
            Some(e) => {
                tracing::warn!(effect = %pending.id, error = %e, "the announcement's groups could not be read; it stays pending");
                return Finished {
                    event: None,
                    now,
                    record: None,
                    undeliverable: Some(pending.id),
                    asked: None,
                    took: Duration::ZERO,
                };
            }
            None if members.len() > directory::MEMBERS_READ_MAX => EventKind::NotificationDropped {
                effect: pending.id,
                reason: format!(
                    "its groups ({}) have more than {} members, too many to mail: name \
                         smaller groups, or a distribution list's address",
                    message.groups.join(", "),
                    directory::MEMBERS_READ_MAX
                ),
            },
            None => match directory::mail_recipients(&message.addresses, &members, max) {
                Ok(recipients)
                    if recipients.addresses.is_empty() && message.addresses.is_empty() =>
                {
                    EventKind::NotificationDropped {
                        effect: pending.id,
                        reason: format!(
                            "nobody to send it to: none of the {} members of {} has a mail address",
                            members.len(),
                            message.groups.join(", ")
                        ),
                    }
                }
                Ok(recipients) => EventKind::RecipientsResolved {
                    effect: pending.id,
                    recipients,
                },
                Err(reason) => EventKind::NotificationDropped {
                    effect: pending.id,
                    reason,
                },
            },
        };
        let reason = match &kind {
            EventKind::RecipientsResolved { recipients, .. } => format!(
                "members read ({}): {} to mail, digest {}",
                read.join(", "),
                recipients.addresses.len(),
                recipients.digest()
            ),
            _ => format!("members read ({})", read.join(", ")),
        };
        let event = Event {
            kind,
            trigger: trigger(reason),
        };
        Task::finished(event, now, None)
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
            message,
        } = &pending.effect
        else {
            unreachable!("only notifications are delivered");
        };
        // Unique across stores: two stores' rollouts may share an id, never a key.
        let key = format!("{}/{}:{}", self.store_id, self.rollout, pending.id);
        let mut body = serde_json::json!({
            "idempotencyKey": key,
            "rollout": self.rollout,
            "plan": self.plan_name,
            "status": status.as_str(),
            "previousStatus": previous.as_str(),
            "reason": reason,
            "at": at.rfc3339(),
            "chainHead": self.head,
        });
        if let Some(message) = message {
            body["announcement"] = serde_json::to_value(message).expect("json serializes");
        }
        let delivery = Delivery {
            key: &key,
            to,
            body: serde_json::to_vec(&body).expect("json serializes"),
            about: message.as_ref().map(|message| crate::notifier::About {
                message,
                rollout: &self.rollout,
                plan: &self.plan_name,
                status: *status,
            }),
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
                format!(
                    "{} answered {status}{}",
                    crate::notifier::describe(to),
                    message.as_ref().map(told).unwrap_or_default()
                ),
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
        let scope_of = |idx: usize| PhaseScope {
            phase: plan.phases[idx].id.clone(),
            mode: plan.phases[idx].mode,
            include: plan.phases[idx].include.clone(),
            exclude: plan.phases[idx].exclude.clone(),
            exclude_users: plan.emergency_access.users.clone(),
        };
        let observed: Vec<usize> = phases
            .iter()
            .filter_map(|id| plan.phase_index(id))
            .collect();
        let mut scopes: Vec<PhaseScope> = observed.iter().map(|&idx| scope_of(idx)).collect();
        // The phases each observed phase's promotion starts are forecast on their own scopes'
        // reports; a scope asked for already is read once.
        let same =
            |a: &PhaseScope, b: &PhaseScope| a.include == b.include && a.exclude == b.exclude;
        let mut successors: Vec<(usize, usize, usize)> = Vec::new();
        for (at, &idx) in observed.iter().enumerate() {
            for next in (0..plan.phases.len()).filter(|&n| plan.phases[n].after.contains(&idx)) {
                let scope = scope_of(next);
                let reports = match scopes.iter().position(|s| same(s, &scope)) {
                    Some(known) => known,
                    None => {
                        scopes.push(scope);
                        scopes.len() - 1
                    }
                };
                successors.push((at, next, reports));
            }
        }
        let record = self.record.clone().unwrap_or(serde_json::Value::Null);
        let observation = provider.observe(&plan.policy, &scopes, &record).await;
        let now = provider.now();
        // The sign-in log is read only for an observation that will be recorded as one (not
        // after a failure or drift): its requests are rate-limited.
        let mut signins = match &observation {
            Ok(seen) if seen.drift.is_empty() => {
                // Only the observed phases' own scopes: a successor's is read for its forecast.
                let own = &scopes[..observed.len()];
                self.observe_signins(own, &record, now, provider).await
            }
            _ => BTreeMap::new(),
        };
        let kind = match observation {
            Ok(observation) if !observation.drift.is_empty() => EventKind::DriftDetected {
                effect: None,
                changes: observation.drift,
            },
            Ok(observation) if observation.scopes.len() < scopes.len() => {
                EventKind::ProviderFailed {
                    effect: None,
                    error: format!(
                        "observing {}: the provider answered for {} of {} scopes",
                        phases.join(", "),
                        observation.scopes.len(),
                        scopes.len()
                    ),
                }
            }
            Ok(observation) => {
                let reports = &observation.scopes;
                let observations = observed
                    .iter()
                    .enumerate()
                    .map(|(at, &idx)| {
                        let phase = &plan.phases[idx];
                        let stale_after = phase.gate.stale_after;
                        let platforms = &reports[at];
                        let by_platform: Vec<_> = platforms
                            .iter()
                            .map(|(platform, reports)| {
                                (*platform, gate::tally(reports, stale_after, now))
                            })
                            .collect();
                        let tally = by_platform
                            .iter()
                            .fold(gate::Tally::default(), |sum, (_, t)| sum.plus(t));
                        let forecasts = successors
                            .iter()
                            .filter(|(of, _, _)| *of == at)
                            .map(|&(_, next, scope)| {
                                forecast::forecast(
                                    &phase.id,
                                    &plan.phases[next],
                                    &reports[scope],
                                    &observation.labels,
                                    now,
                                )
                            })
                            .collect();
                        PhaseObservation {
                            phase: phase.id.clone(),
                            at: now,
                            tally,
                            by_platform: if by_platform.len() > 1 {
                                by_platform
                            } else {
                                Vec::new()
                            },
                            impact: Some(forecast::impact(platforms, stale_after, now)),
                            forecasts,
                            signins: signins.remove(&phase.id),
                            userless: observation.userless.get(at).copied().unwrap_or(0),
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

/// Whether `run` would carry out any of the rollout's pending effects now (a notification is
/// always delivered; a configuration effect as [`may_carry_out`] says).
pub fn may_carry_out_any(rollout: &Rollout) -> bool {
    let asked = std::collections::BTreeSet::new();
    rollout
        .pending
        .iter()
        .any(|p| p.effect.is_notification() || may_carry_out(rollout, p, &asked))
}

/// Whether a pending configuration effect may be carried out now: never while the rollout is
/// paused (a pause stops every change to the tenant until `resume`, but for the exemptions of an
/// exception granted, revoked or ended meanwhile when the pause holds nothing else), failed or
/// drifted (a person decides first), and a held one is asked about once per drive.
fn may_carry_out(
    rollout: &Rollout,
    pending: &PendingEffect,
    asked: &std::collections::BTreeSet<crate::domain::event::EffectId>,
) -> bool {
    let exemptions_only = rollout.status == RolloutStatus::Paused
        && matches!(
            pending.effect,
            Effect::Reconcile {
                during_pause: true,
                ..
            }
        );
    (exemptions_only
        || !matches!(
            rollout.status,
            RolloutStatus::Paused | RolloutStatus::Failed | RolloutStatus::Drifted
        ))
        && rollout.drift.is_empty()
        && !asked.contains(&pending.id)
}

/// The rollout cannot move on without a person, or is done.
pub fn should_stop(rollout: &Rollout) -> bool {
    stops(
        rollout.status,
        rollout.phases.iter().any(|p| p.hold_expired),
    )
}

/// [`should_stop`], from the rollout's status and whether any phase's hold has expired (all it
/// looks at, so that a rollout read at a glance is judged by the same rule).
pub fn stops(status: RolloutStatus, hold_expired: bool) -> bool {
    use RolloutStatus::*;
    match status {
        Running | RollingBack | Aborting => false,
        Held => hold_expired,
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
        impact: transition.impact.clone(),
        prev_hash: String::new(),
        hash: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::plan;

    /// A resume reads each plan file once and judges every rollout of it against that reading;
    /// a missing file is no change.
    #[test]
    fn plan_files_are_read_once_per_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.toml");
        std::fs::write(&path, "first").unwrap();
        let record = |hash: &str| PlanRecord {
            path: path.display().to_string(),
            source: String::new(),
            hash: hash.into(),
        };
        let first = plan::hash_source("first");
        let files = PlanFiles::default();
        assert!(!files.differs(&record(&first), &first, None, None));
        assert!(files.differs(&record("older"), "older", None, None));
        std::fs::write(&path, "second").unwrap();
        assert!(
            !files.differs(&record(&first), &first, None, None),
            "read once per pass"
        );
        assert!(
            plan_file_differs(&record(&first), &first, None, None),
            "a new reading sees the edit"
        );
        let gone = PlanRecord {
            path: dir.path().join("gone.toml").display().to_string(),
            ..record(&first)
        };
        assert!(!PlanFiles::default().differs(&gone, &first, None, None));
    }

    /// A stored plan is parsed once and shared by every load of it; a text that does not hash to
    /// its record's hash is parsed each time and never kept.
    #[test]
    fn stored_plans_are_shared_and_only_under_their_own_hash() {
        // A text of its own: other tests share the process's plans.
        let source = format!(
            "{}\n# shared once\n",
            include_str!("../plans/windows-baseline.toml")
        );
        let record = PlanRecord {
            path: "plans/shared-once.toml".into(),
            hash: plan::hash_source(&source),
            source: source.clone(),
        };
        let first = stored_plan(&record).unwrap();
        let again = stored_plan(&record).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "one parse, shared");
        assert_eq!(first.hash, record.hash);

        let mislabelled = PlanRecord {
            hash: "not-its-hash".into(),
            ..record
        };
        let once = stored_plan(&mislabelled).unwrap();
        let twice = stored_plan(&mislabelled).unwrap();
        assert!(!Arc::ptr_eq(&once, &twice), "never kept under another hash");
        assert_eq!(once.hash, plan::hash_source(&source));
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
                facts: Default::default(),
            };
            Ok(crate::provider::Observation {
                scopes: scopes
                    .iter()
                    .map(|_| vec![(crate::domain::plan::Platform::Windows, vec![failing; 10])])
                    .collect(),
                drift: Vec::new(),
                labels: Default::default(),
                userless: Vec::new(),
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

    #[test]
    fn an_undeliverable_notification_rests_longer_each_pass_up_to_a_bound() {
        let id = crate::domain::event::EffectId { seq: 3, index: 1 };
        let failed = Finished {
            event: None,
            now: Timestamp::from_millis(0),
            record: None,
            undeliverable: Some(id),
            asked: None,
            took: Duration::ZERO,
        };
        let mut skips = Skips::default();
        let t0 = std::time::Instant::now();
        let mut now = t0;
        let mut rests = Vec::new();
        for _ in 0..20 {
            skips.note_at(&failed, now);
            assert!(skips.undeliverable.contains(&id));
            let due = skips.release(now).expect("it waits for its next pass");
            assert!(
                skips.undeliverable.contains(&id),
                "not before its rest is over"
            );
            rests.push(due - now);
            now = due;
            assert_eq!(skips.release(now), None, "nothing else waits");
            assert!(
                !skips.undeliverable.contains(&id),
                "tried again once it is over"
            );
        }
        assert!(rests[0] >= Duration::from_secs(1) && rests[0] <= Duration::from_secs(2));
        assert!(rests[3] > rests[0], "{rests:?}");
        assert!(rests.iter().all(|r| *r <= OUTBOX_RETRY.cap), "{rests:?}");
        assert!(*rests.last().unwrap() >= OUTBOX_RETRY.cap / 2, "{rests:?}");
    }
}
