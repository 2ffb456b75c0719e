//! The runner: the one place where inputs are applied to rollouts, between the front ends (the
//! CLI, the HTTP API) and the engine.
//!
//! Every rollout that can move has an actor (a task) that owns it: the rollout as loaded, its
//! connected provider (reused across ticks), and at most one piece of work in flight. An actor
//! takes a closed set of inputs — a person's **command**, the **outcome** of its work, a
//! **deadline** reached, **shutdown** — and applies each through the engine, which commits it
//! before anything is done about it. Work (a provider call, a webhook delivery) runs beside the
//! actor, owning what it needs, so a command never waits for the backend: pausing or aborting a
//! rollout whose tenant hangs is recorded at once, with no provider call at all, and carried out
//! when the work in flight returns. Each input may cause a bounded number of automatic steps, so
//! no loop can spin.
//!
//! Shutdown finishes the work in flight (its outcome is committed), then stops; a restart resumes
//! from the store, as after a crash.
//!
//! **Replicas.** On PostgreSQL `serve` is one of many replicas ([`Leasing`]): an actor runs only
//! for a rollout whose lease this replica holds. Leases are taken at resume, when a command or a
//! plan change arrives for an unowned rollout, and every `renew_every`, when the held ones are
//! renewed, the actors of lost ones stopped, and unowned rollouts that can move taken up to the
//! limit. A taken-over rollout's actor starts from the store, as after a crash. An actor whose
//! commit is fenced (another replica took the lease) ends quietly; one that ends otherwise
//! releases its lease, and so does shutdown. A command for a rollout another replica owns is
//! recorded in the store for the owner, which takes it out, carries it out through its actor and
//! records the answer for the replica the command reached ([`forward`], [`take_forwarded`]).
//! An owner confirms its lease in the database right before each effect, and a provider whose
//! tenant cannot refuse a stale writer (Graph) asks again right before each write, confirming it
//! anew when the last confirmation is older than half a lease ([`lease_guard`]).
//!
//! **Resuming.** At start the runner lists the store once (on a blocking thread, so the API
//! answers meanwhile) and sorts the rollouts by what the record alone says. One that can move by
//! itself — it has effects pending, or its status lets it progress (running, rolling back,
//! aborting, a hold that has not expired) is loaded from the listed record, a few at a time on
//! blocking threads (its plan parsed once per plan hash), and gets its actor as soon as it is
//! ready; the actor either starts work or sleeps until the next deadline, and one whose deadline
//! passed while the process was down is worked or ticked straight away. One that waits for a person (paused, awaiting an approval, failed, drifted, ...)
//! and has no active exception (whose end is a deadline whatever the status)
//! has nothing due whatever its plan says, so under `serve` it gets no actor until something
//! happens to it: a command (which starts its actor, as for any rollout) or an edited plan file,
//! which a background sweep looks for right after resuming, as every actor used to at its start.
//! The runner is **resumed** (see [`Handle::resumed`]) once every rollout that can move has its
//! actor running work, sleeping until its deadline, or idle. `phasegate run` (until idle) starts
//! an actor for every unfinished rollout, as its report lists each one.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::domain::event::{Event, EventKind, Trigger};
use crate::domain::machine;
use crate::domain::rollout::{RolloutGlance, RolloutStatus};
use crate::domain::time::Timestamp;
use crate::engine::{self, Engine, EngineError, Finished, Limits, Loaded, Skips, Work};
use crate::notifier::Notifier;
use crate::provider::{self, Provider};
use crate::store::{EventRecord, Glanced, Store, StoredRollout};

mod census;
mod lease_guard;
use census::Census;
use lease_guard::LeaseGuard;

/// A committed transition, as the watchers see it.
#[derive(Clone, Debug)]
pub struct Announcement {
    pub rollout: String,
    pub record: EventRecord,
    pub status: RolloutStatus,
}

/// How long a runner keeps going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// Until every rollout is finished or needs a person (`phasegate run`).
    Idle,
    /// Until shut down (`phasegate serve`): new rollouts and decisions are taken as they come.
    Shutdown,
}

/// What a runner is told at start.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Recorded as the actor of automatic events.
    pub actor: String,
    pub until: Until,
    /// Drive only this rollout.
    pub only: Option<String>,
    /// Do what is due now and stop (`run --once`).
    pub once: bool,
    pub limits: Limits,
    /// On PostgreSQL: drive a rollout only while holding its lease (one of many replicas).
    pub leasing: Option<Leasing>,
}

/// How a replica on PostgreSQL shares the store's rollouts with the other replicas: it drives a
/// rollout only while it holds the rollout's lease, takes unowned (or expired) ones up to
/// `max_rollouts`, renews what it holds every `renew_every`, and stops driving a rollout whose
/// lease it lost (its commits would be fenced anyway).
#[derive(Clone, Debug)]
pub struct Leasing {
    /// This replica's name in the leases (unique per process).
    pub replica: String,
    pub lease: Duration,
    pub renew_every: Duration,
    pub max_rollouts: usize,
}

/// The most rollouts one replica may drive at once.
pub const MAX_ROLLOUTS: usize = 100_000;

/// A person's command for one rollout.
struct Command {
    kind: EventKind,
    /// `plan apply`: the plan's file name and text (then `kind` is unused).
    plan: Option<(String, String)>,
    by: String,
    reason: String,
    reply: oneshot::Sender<Result<Option<EventRecord>, EngineError>>,
    /// How many times it came back from an owner that stopped before taking it.
    hops: u8,
}

enum Control {
    Command { id: String, command: Box<Command> },
    Watch { id: String },
}

/// How an actor ended.
#[derive(Debug)]
struct Ended {
    id: String,
    status: Option<RolloutStatus>,
    error: Option<String>,
    /// Its commit was refused: another replica holds the rollout's lease now.
    fenced: bool,
}

/// A running actor: its inbox, and its own stop (shutdown, or a lease lost).
struct Driven {
    inbox: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
}

fn is_fenced(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::Store(crate::store::StoreError::Fenced { .. })
    )
}

/// The shared parts of a runner: the store, the notifier, the announcements.
struct Shared {
    store: Arc<Store>,
    notifier: &'static dyn Notifier,
    announcements: broadcast::Sender<Announcement>,
    settings: Settings,
    /// Turns true once every rollout that could move at start has its actor going.
    resumed: watch::Sender<bool>,
    created: Instant,
}

impl Shared {
    fn engine(&self) -> Engine<'_> {
        Engine {
            store: &self.store,
            notifier: self.notifier,
            actor: self.settings.actor.clone(),
            delivery: crate::retry::Backoff::WEBHOOK,
            limits: self.settings.limits,
        }
    }

    fn announce(&self, loaded: &Loaded, record: &EventRecord) {
        self.announce_rollout(&loaded.stored.rollout, record);
    }

    fn announce_rollout(&self, rollout: &crate::domain::rollout::Rollout, record: &EventRecord) {
        crate::metrics::global().transition(record.event.kind.name());
        let _ = self.announcements.send(Announcement {
            rollout: rollout.id.clone(),
            record: record.clone(),
            status: rollout.status,
        });
    }
}

/// A front end's way in: commands for rollouts, starting to drive new ones, and the stream of
/// transitions. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    control: mpsc::Sender<Control>,
    announcements: broadcast::Sender<Announcement>,
    store: Arc<Store>,
    resumed: watch::Receiver<bool>,
}

impl Handle {
    /// Applies a person's command to a rollout through its actor: recorded at once, whatever the
    /// backend is doing.
    pub async fn command(
        &self,
        id: &str,
        kind: EventKind,
        by: &str,
        reason: &str,
    ) -> Result<Option<EventRecord>, EngineError> {
        self.send(id, kind, None, by, reason).await
    }

    /// A person applies a plan (`file` names it, `source` is its text) to a rollout through its
    /// actor (see `Engine::apply_plan`).
    pub async fn apply_plan(
        &self,
        id: &str,
        file: &str,
        source: String,
        by: &str,
        reason: &str,
    ) -> Result<Option<EventRecord>, EngineError> {
        let plan = Some((file.to_string(), source));
        self.send(id, EventKind::Tick, plan, by, reason).await
    }

    async fn send(
        &self,
        id: &str,
        kind: EventKind,
        plan: Option<(String, String)>,
        by: &str,
        reason: &str,
    ) -> Result<Option<EventRecord>, EngineError> {
        let (reply, answer) = oneshot::channel();
        let command = Command {
            kind,
            plan,
            by: by.to_string(),
            reason: reason.to_string(),
            reply,
            hops: 0,
        };
        self.control
            .send(Control::Command {
                id: id.to_string(),
                command: Box::new(command),
            })
            .await
            .map_err(|_| shutting_down())?;
        answer.await.map_err(|_| shutting_down())?
    }

    /// Starts driving a rollout that was just created.
    pub async fn watch(&self, id: &str) {
        let _ = self
            .control
            .send(Control::Watch { id: id.to_string() })
            .await;
    }

    /// Every transition committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Announcement> {
        self.announcements.subscribe()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Turns true once the runner has resumed the store: every rollout that can move by itself
    /// has its actor working, sleeping until its next deadline, or idle (see the module docs).
    pub fn resumed(&self) -> watch::Receiver<bool> {
        self.resumed.clone()
    }
}

/// What a runner did, for `run`'s exit code and summary.
#[derive(Debug, Default)]
pub struct Report {
    /// The status each driven rollout ended in.
    pub rollouts: BTreeMap<String, RolloutStatus>,
    /// Rollouts that stopped on an error, with it.
    pub errors: BTreeMap<String, String>,
}

pub struct Runner {
    shared: Arc<Shared>,
    control: mpsc::Receiver<Control>,
    handle: Handle,
    /// The listing of the store, begun as soon as the runner is made.
    loading: Option<Loading>,
}

impl Runner {
    pub fn new(store: Arc<Store>, notifier: &'static dyn Notifier, settings: Settings) -> Runner {
        if let Some(leasing) = &settings.leasing {
            store.set_replica(&leasing.replica);
        }
        let (announcements, _) = broadcast::channel(4096);
        let (control_tx, control) = mpsc::channel(256);
        let (resumed_tx, resumed) = watch::channel(false);
        let handle = Handle {
            control: control_tx,
            announcements: announcements.clone(),
            store: store.clone(),
            resumed,
        };
        let shared = Arc::new(Shared {
            store,
            notifier,
            announcements,
            settings,
            resumed: resumed_tx,
            created: Instant::now(),
        });
        // Begun at once (in a runtime), so the listing overlaps what the front end does before
        // `run` (binding its listener, publishing its address).
        let loading = tokio::runtime::Handle::try_current()
            .is_ok()
            .then(|| start_loading(&shared));
        Runner {
            shared,
            control,
            handle,
            loading,
        }
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Drives rollouts until the runner's `until` is reached or `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<Report, EngineError> {
        // The store is listed and the rollouts to drive loaded on blocking threads, so the API
        // answers meanwhile; each actor starts as its rollout is loaded.
        let (listed, mut ready) = self.list_and_load().await?;
        let (ended_tx, mut ended_rx) = mpsc::channel::<Ended>(1024);
        let mut actors: BTreeMap<String, Driven> = BTreeMap::new();
        let mut report = Report::default();
        let spawn = |id: &str, start: Start, actors: &mut BTreeMap<String, Driven>| {
            let (tx, rx) = mpsc::channel(64);
            let (stop_tx, stop) = watch::channel(false);
            actors.insert(
                id.to_string(),
                Driven {
                    inbox: tx,
                    stop: stop_tx,
                },
            );
            let shared = self.shared.clone();
            let ended = ended_tx.clone();
            let id = id.to_string();
            tokio::spawn(async move {
                let outcome = Actor::new(shared, id.clone(), rx, stop, start).run().await;
                let _ = ended.send(outcome).await;
            });
        };
        let leasing = self.shared.settings.leasing.clone();
        // Whether this runner may drive rollout `id` now: always, or while it holds its lease
        // (taken now if it is free and this replica drives fewer than its limit).
        let store = self.shared.store.clone();
        let may_drive = |id: &str, driving: usize| -> bool {
            let Some(leasing) = &leasing else {
                return true;
            };
            if store.holds_lease(id) {
                return true;
            }
            if driving >= leasing.max_rollouts {
                return false;
            }
            match store.acquire_lease(id, leasing.lease) {
                Ok(Some(epoch)) => {
                    tracing::info!(rollout = %id, epoch, replica = %leasing.replica, "took the rollout's lease");
                    true
                }
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(rollout = %id, error = %e, "could not take the rollout's lease");
                    false
                }
            }
        };
        let mut census = Census::default();
        let mut lease_tick = tokio::time::interval(
            leasing
                .as_ref()
                .map_or(Duration::from_secs(3600), |l| l.renew_every),
        );
        lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inbox_tick = tokio::time::interval(FORWARD_POLL);
        inbox_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resuming = Some(Arc::new(Resuming {
            shared: self.shared.clone(),
            driven: listed.due,
            waiting: listed.parked.len(),
            given_up: std::sync::atomic::AtomicBool::new(false),
        }));
        let mut parked = Some(listed.parked);
        let mut sweep = None;
        // Rollouts given an actor from the store while the others load: what was loaded of them
        // before may be out of date.
        let mut started_meanwhile = std::collections::BTreeSet::new();
        tokio::pin!(shutdown);
        let mut stopping = false;
        loop {
            let loading = resuming.is_some();
            if actors.is_empty()
                && (stopping || (self.shared.settings.until == Until::Idle && !loading))
            {
                break;
            }
            tokio::select! {
                loaded = ready.recv(), if loading && !stopping => match loaded {
                    Some(Ready { loaded, plan_changed }) => {
                        let id = loaded.as_ref().map_or_else(|(id, _)| id.clone(), |l| l.stored.rollout.id.clone());
                        // A command may have started it already, from the store.
                        if !actors.contains_key(&id) && !started_meanwhile.contains(&id) && may_drive(&id, actors.len()) {
                            let start = Start { loaded: Some(loaded), plan_changed, resuming: resuming.clone() };
                            spawn(&id, start, &mut actors);
                        }
                    }
                    None => {
                        resuming = None;
                        started_meanwhile.clear();
                        let parked = parked.take().unwrap_or_default();
                        if !parked.is_empty() {
                            sweep = Some(tokio::spawn(sweep_plan_files(
                                self.shared.store.clone(),
                                parked,
                                self.handle.control.clone(),
                            )));
                        }
                    }
                },
                () = &mut shutdown, if !stopping => {
                    tracing::info!("shutting down: finishing the work in flight");
                    stopping = true;
                    for actor in actors.values() {
                        let _ = actor.stop.send(true);
                    }
                    if let Some(resuming) = &resuming {
                        resuming.given_up.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Some(control) = self.control.recv(), if !stopping => match control {
                    Control::Command { id, command } => {
                        let command = *command;
                        if !actors.contains_key(&id) {
                            if !may_drive(&id, actors.len()) {
                                let owner = self.shared.store.leases().ok().and_then(|all| {
                                    all.into_iter().find(|l| l.rollout == id && l.remaining_ms > 0)
                                });
                                match owner {
                                    // Recorded in the store for the owner, which carries it out.
                                    Some(lease) => {
                                        let control = self.handle.control.clone();
                                        tokio::spawn(forward(self.shared.store.clone(), control, id, lease.owner, command));
                                    }
                                    None => {
                                        let _ = command.reply.send(Err(EngineError::Claimed(format!(
                                            "rollout `{id}` is not driven by this replica (it drives as many rollouts as it may); try another replica"
                                        ))));
                                    }
                                }
                                continue;
                            }
                            if resuming.is_some() {
                                started_meanwhile.insert(id.clone());
                            }
                            spawn(&id, Start::default(), &mut actors);
                        }
                        if let Some(actor) = actors.get(&id)
                            && let Err(refused) = actor.inbox.send(command).await
                        {
                            let _ = refused.0.reply.send(Err(not_driven_now(&id)));
                        }
                    }
                    Control::Watch { id } => {
                        if !actors.contains_key(&id) && may_drive(&id, actors.len()) {
                            if resuming.is_some() {
                                started_meanwhile.insert(id.clone());
                            }
                            spawn(&id, Start::default(), &mut actors);
                        }
                    }
                },
                _ = lease_tick.tick(), if leasing.is_some() && !stopping => {
                    if let Some(leasing) = &leasing {
                        tend_leases(&self.shared, leasing, &mut census, &mut actors, &mut |id, actors| {
                            if may_drive(id, actors.len()) {
                                spawn(id, Start::default(), actors);
                            }
                        });
                    }
                }
                _ = inbox_tick.tick(), if leasing.is_some() && !stopping => {
                    for (id, command) in take_forwarded(&self.shared.store, &actors) {
                        if let Some(actor) = actors.get(&id)
                            && let Err(refused) = actor.inbox.send(command).await
                        {
                            let _ = refused.0.reply.send(Err(not_driven_now(&id)));
                        }
                    }
                }
                Some(ended) = ended_rx.recv() => {
                    actors.remove(&ended.id);
                    if leasing.is_some() && !ended.fenced {
                        // Finished, stopped or failed here: another replica may take it now.
                        if let Err(e) = self.shared.store.release_lease(&ended.id) {
                            tracing::warn!(rollout = %ended.id, error = %e, "could not release the rollout's lease");
                        }
                    }
                    if ended.fenced {
                        tracing::warn!(rollout = %ended.id, "lost the rollout's lease: another replica drives it now; committed nothing more");
                        continue;
                    }
                    if let Some(status) = ended.status {
                        report.rollouts.insert(ended.id.clone(), status);
                    }
                    if let Some(error) = ended.error {
                        tracing::warn!(rollout = %ended.id, %error, "stopped driving the rollout");
                        report.errors.insert(ended.id, error);
                    }
                }
            }
        }
        if let Some(sweep) = sweep {
            sweep.abort();
        }
        if leasing.is_some() {
            for (id, _) in self.shared.store.held_leases() {
                if let Err(e) = self.shared.store.release_lease(&id) {
                    tracing::warn!(rollout = %id, error = %e, "could not release the rollout's lease");
                }
            }
        }
        self.shared.store.flush()?;
        Ok(report)
    }
}

/// The tree where a replica records a command for a rollout another replica owns, and the one
/// where the owner records its answer.
const FORWARDED: &str = "commands";
const ANSWERS: &str = "command-answers";
/// How often the owner looks for forwarded commands and the forwarder for their answers.
const FORWARD_POLL: Duration = Duration::from_millis(200);
/// How long a forwarder waits for the owner to take its command (and, once taken, to answer).
const FORWARD_WAIT: Duration = Duration::from_secs(30);
/// How long a forwarder still waits for the answer of an owner that took the command and then
/// lost its lease (the answer is written before the lease goes, unless the owner stopped).
const ANSWER_GRACE: Duration = Duration::from_secs(2);
/// How many times a command goes back to the runner because the owner it was forwarded to
/// stopped before taking it (each time the rollout is taken or forwarded to its new owner).
const FORWARD_HOPS: u8 = 4;

/// A person's command recorded in the store for the replica that owns the rollout.
#[derive(serde::Serialize, serde::Deserialize)]
struct Forwarded {
    rollout: String,
    kind: EventKind,
    plan: Option<(String, String)>,
    by: String,
    reason: String,
}

/// The owner's answer to a forwarded command.
#[derive(serde::Serialize, serde::Deserialize)]
enum Answer {
    Done(Option<Box<EventRecord>>),
    /// Refused; `conflict`: by the rollout's state (a 409 through the API); `retry`: nothing was
    /// done for a passing reason, the same command may be sent again (a 503). Absent in answers
    /// of replicas from before it was recorded: not to be retried.
    Refused {
        message: String,
        conflict: bool,
        #[serde(default)]
        retry: bool,
    },
}

/// The answer to a command the runner no longer takes: another replica, or this one restarted,
/// will.
fn shutting_down() -> EngineError {
    EngineError::Unavailable("phasegate is shutting down; try again".into())
}

/// The answer to a command for a rollout whose actor ended before taking it: nothing was done,
/// and whoever drives the rollout next (this replica's next actor or another replica) will take
/// the same command.
fn not_driven_now(id: &str) -> EngineError {
    EngineError::Unavailable(format!(
        "rollout `{id}` is not being driven now (its driver just stopped); nothing was done, try again"
    ))
}

/// Records `command` for `owner`, the replica holding the rollout's lease, and answers with what
/// the owner answered. A command the owner did not take within [`FORWARD_WAIT`] is withdrawn
/// (nothing was done). One whose owner lost its lease before taking it (killed, paused, cut off)
/// is withdrawn too and handed back to this replica's runner through `control`, which takes the
/// rollout (its lease expired) or forwards the command to the new owner: a command given during a
/// failover waits for the failover, not for [`FORWARD_WAIT`].
async fn forward(
    store: Arc<Store>,
    control: mpsc::Sender<Control>,
    id: String,
    owner: String,
    command: Command,
) {
    let Command {
        kind,
        plan,
        by,
        reason,
        reply,
        hops,
    } = command;
    let forwarded = Forwarded {
        rollout: id.clone(),
        kind,
        plan,
        by,
        reason,
    };
    let forwarded = match forward_and_wait(&store, &owner, forwarded).await {
        Ok(Forwarding::Answered(answer)) => {
            let _ = reply.send(answer);
            return;
        }
        Err(e) => {
            let _ = reply.send(Err(e));
            return;
        }
        Ok(Forwarding::OwnerGone(forwarded)) => forwarded,
    };
    if hops >= FORWARD_HOPS {
        let _ = reply.send(Err(EngineError::Unavailable(format!(
            "rollout `{id}`: {} owners in a row stopped before taking the command; nothing was done",
            hops + 1
        ))));
        return;
    }
    tracing::info!(rollout = %id, %owner, "the rollout's owner lost its lease before taking the command: giving it to the next owner");
    let command = Command {
        kind: forwarded.kind,
        plan: forwarded.plan,
        by: forwarded.by,
        reason: forwarded.reason,
        reply,
        hops: hops + 1,
    };
    let command = Box::new(command);
    if let Err(refused) = control.send(Control::Command { id, command }).await
        && let Control::Command { command, .. } = refused.0
    {
        let _ = command.reply.send(Err(shutting_down()));
    }
}

/// How a forwarded command ended.
enum Forwarding {
    /// The owner carried it out (or refused it): its answer.
    Answered(Result<Option<EventRecord>, EngineError>),
    /// The owner lost the rollout's lease before taking it: withdrawn, nothing was done.
    OwnerGone(Forwarded),
}

async fn forward_and_wait(
    store: &Store,
    owner: &str,
    forwarded: Forwarded,
) -> Result<Forwarding, EngineError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| EngineError::Invalid(format!("no randomness from the system: {e}")))?;
    let key = hex::encode(bytes);
    let (commands, answers) = (store.tree(FORWARDED), store.tree(ANSWERS));
    let id = forwarded.rollout.clone();
    commands.insert(&key, crate::store::encode_json(&forwarded))?;
    tracing::info!(rollout = %id, %owner, "forwarded a command to the rollout's owner");
    let started = Instant::now();
    let mut owner_gone: Option<Instant> = None;
    loop {
        if let Some(bytes) = answers.remove(&key)? {
            return Ok(Forwarding::Answered(
                match crate::store::decode_json::<Answer>(ANSWERS, &bytes)? {
                    Answer::Done(record) => Ok(record.map(|r| *r)),
                    Answer::Refused {
                        message, conflict, ..
                    } if conflict => Err(EngineError::Claimed(message)),
                    Answer::Refused { message, retry, .. } if retry => {
                        Err(EngineError::Unavailable(message))
                    }
                    Answer::Refused { message, .. } => Err(EngineError::Invalid(message)),
                },
            ));
        }
        // A lookup that fails says nothing about the owner: wait on.
        let lost = store
            .lease_holder(&id)
            .is_ok_and(|holder| holder.as_deref() != Some(owner));
        if owner_gone.is_none() && lost {
            // Not taken yet: withdrawn, for whoever drives the rollout next.
            if commands.remove(&key)?.is_some() {
                return Ok(Forwarding::OwnerGone(forwarded));
            }
            owner_gone = Some(Instant::now());
        }
        if owner_gone.is_some_and(|at| at.elapsed() > ANSWER_GRACE) {
            return Err(EngineError::Invalid(format!(
                "rollout `{id}`: replica {owner} took the command and lost the rollout's lease before answering; see the rollout's history"
            )));
        }
        if started.elapsed() > FORWARD_WAIT {
            if commands.remove(&key)?.is_some() {
                return Err(EngineError::Unavailable(format!(
                    "rollout `{id}`: its owner, replica {owner}, did not take the command within {}s; nothing was done",
                    FORWARD_WAIT.as_secs()
                )));
            }
            if started.elapsed() > 2 * FORWARD_WAIT {
                return Err(EngineError::Invalid(format!(
                    "rollout `{id}`: replica {owner} took the command but has not answered; see the rollout's history"
                )));
            }
        }
        tokio::time::sleep(FORWARD_POLL).await;
    }
}

/// The forwarded commands for rollouts this replica drives, taken out of the store (each by one
/// replica only: whoever removes it), each with a reply that records the answer for its forwarder.
fn take_forwarded(store: &Arc<Store>, actors: &BTreeMap<String, Driven>) -> Vec<(String, Command)> {
    let commands = store.tree(FORWARDED);
    let listed = match commands.scan_prefix(b"") {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the forwarded commands");
            return Vec::new();
        }
    };
    let mut taken = Vec::new();
    for (key, bytes) in listed {
        let Ok(forwarded) = crate::store::decode_json::<Forwarded>(FORWARDED, &bytes) else {
            let _ = commands.remove(&key);
            continue;
        };
        if !actors.contains_key(&forwarded.rollout) || !store.holds_lease(&forwarded.rollout) {
            continue;
        }
        if !matches!(commands.remove(&key), Ok(Some(_))) {
            continue;
        }
        let (reply, answered) = oneshot::channel::<Result<Option<EventRecord>, EngineError>>();
        let store = store.clone();
        let rollout = forwarded.rollout.clone();
        tokio::spawn(async move {
            let answer = match answered.await {
                Ok(Ok(record)) => Answer::Done(record.map(Box::new)),
                Ok(Err(e)) => Answer::Refused {
                    conflict: matches!(
                        e,
                        EngineError::Rejected(_)
                            | EngineError::Claimed(_)
                            | EngineError::Store(
                                crate::store::StoreError::Conflict { .. }
                                    | crate::store::StoreError::Fenced { .. }
                            )
                    ),
                    retry: matches!(e, EngineError::Unavailable(_)),
                    message: e.to_string(),
                },
                Err(_) => Answer::Refused {
                    message: not_driven_now(&rollout).to_string(),
                    conflict: false,
                    retry: true,
                },
            };
            if let Err(e) = store
                .tree(ANSWERS)
                .insert(&key, crate::store::encode_json(&answer))
            {
                tracing::warn!(rollout = %rollout, error = %e, "could not record the answer to a forwarded command");
            }
        });
        taken.push((
            forwarded.rollout,
            Command {
                kind: forwarded.kind,
                plan: forwarded.plan,
                by: forwarded.by,
                reason: forwarded.reason,
                reply,
                hops: 0,
            },
        ));
    }
    taken
}

/// Every `renew_every`: renews this replica's leases, stops the actors of those it lost, and
/// takes unowned (or expired) rollouts that can move, up to its limit (`take` starts an actor
/// for one if its lease is taken).
fn tend_leases(
    shared: &Shared,
    leasing: &Leasing,
    census: &mut Census,
    actors: &mut BTreeMap<String, Driven>,
    take: &mut dyn FnMut(&str, &mut BTreeMap<String, Driven>),
) {
    let store = &shared.store;
    match store.renew_leases(leasing.lease) {
        Ok(lost) => {
            for id in lost {
                tracing::warn!(rollout = %id, "the rollout's lease was taken by another replica: stopping its actor");
                if let Some(actor) = actors.get(&id) {
                    let _ = actor.stop.send(true);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not renew the leases"),
    }
    if actors.len() < leasing.max_rollouts {
        take_unowned(shared, leasing, census, actors, take);
    }
    let held: Vec<String> = store.held_leases().into_iter().map(|(id, _)| id).collect();
    crate::metrics::global().set_leases(&leasing.replica, &held);
}

/// Takes rollouts nobody drives, up to the replica's limit: those the [`Census`] knows can move
/// by themselves and whose lease is not live. Reads the leases that are live and every rollout's
/// sequence, and glances only at the records that moved since the last renewal.
fn take_unowned(
    shared: &Shared,
    leasing: &Leasing,
    census: &mut Census,
    actors: &mut BTreeMap<String, Driven>,
    take: &mut dyn FnMut(&str, &mut BTreeMap<String, Driven>),
) {
    let store = &shared.store;
    let live: std::collections::BTreeSet<String> = match store.live_leases() {
        Ok(live) => live.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the leases");
            return;
        }
    };
    let moved = match store.rollout_seqs() {
        Ok(listed) => census.moved(listed),
        Err(e) => {
            tracing::warn!(error = %e, "could not list the rollouts");
            return;
        }
    };
    if !moved.is_empty() {
        let ids: Vec<String> = moved.iter().map(|(id, _)| id.clone()).collect();
        let glanced = match store.glances_of(&ids) {
            Ok(glanced) => glanced,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the rollouts that moved");
                return;
            }
        };
        let mut found: BTreeMap<&str, &RolloutGlance> = BTreeMap::new();
        for listed in &glanced {
            found.insert(listed.glance.id.as_str(), &listed.glance);
        }
        for (id, seq) in &moved {
            match found.get(id.as_str()) {
                Some(rollout) => census.seen(id, *seq, moves_by_itself(rollout)),
                None => census.forget(id),
            }
        }
    }
    let only = shared.settings.only.as_deref();
    let driven = |id: &str| actors.contains_key(id) || only.is_some_and(|only| only != id);
    let wanted: Vec<String> = census
        .to_take(&live, &driven)
        .take(leasing.max_rollouts.saturating_sub(actors.len()))
        .map(str::to_string)
        .collect();
    for id in wanted {
        if actors.len() >= leasing.max_rollouts {
            break;
        }
        take(&id, actors);
    }
}

/// A rollout a replica should take when nobody drives it: unfinished (or with effects still to
/// conclude) and not waiting for a person.
fn moves_by_itself(rollout: &RolloutGlance) -> bool {
    !((finished(rollout.status) && rollout.pending == 0) || waits_for_a_person(rollout))
}

impl Runner {
    /// Waits for the listing begun by [`start_loading`] (begun now if the runner was made
    /// outside a runtime).
    async fn list_and_load(&mut self) -> Result<(Listed, mpsc::Receiver<Ready>), EngineError> {
        let loading = match self.loading.take() {
            Some(loading) => loading,
            None => start_loading(&self.shared),
        };
        let listed = loading
            .listed
            .await
            .map_err(|_| EngineError::Invalid("listing the rollouts failed".into()))??;
        Ok((listed, loading.ready))
    }
}

/// The listing and loading at resume, under way.
struct Loading {
    listed: oneshot::Receiver<Result<Listed, EngineError>>,
    ready: mpsc::Receiver<Ready>,
}

/// Lists the store and sorts the rollouts into those to drive at once and those that wait for a
/// person; then loads the former, a few at a time, each sent as it is ready. All of it on
/// blocking threads: the API answers meanwhile.
fn start_loading(shared: &Shared) -> Loading {
    let store = shared.store.clone();
    let settings = shared.settings.clone();
    let (listed_tx, listed) = oneshot::channel();
    let (ready_tx, ready) = mpsc::channel(256);
    tokio::task::spawn_blocking(move || match resume_plan(&store, &settings) {
        Ok(resume) => {
            let due = resume.due;
            let listed = Listed {
                due: due.len(),
                parked: resume.parked,
            };
            if listed_tx.send(Ok(listed)).is_ok() {
                load_due(&store, due, &ready_tx);
            }
        }
        Err(e) => {
            let _ = listed_tx.send(Err(e));
        }
    });
    Loading { listed, ready }
}

/// What the runner resumes: the rollouts to drive at once, and (under `serve`) those that wait
/// for a person, with the hash of the plan they run.
struct Resume {
    due: Vec<Due>,
    parked: Vec<Parked>,
}

/// A rollout to drive at resume: read whole, or listed at a glance and decoded by its loader.
enum Due {
    Read(Box<StoredRollout>),
    Listed(Glanced),
}

impl Due {
    fn id(&self) -> &str {
        match self {
            Due::Read(stored) => &stored.rollout.id,
            Due::Listed(listed) => &listed.glance.id,
        }
    }

    fn decode(self) -> Result<StoredRollout, EngineError> {
        match self {
            Due::Read(stored) => Ok(*stored),
            Due::Listed(listed) => Ok(listed.decode()?),
        }
    }
}

/// The listing as the runner first sees it: how many rollouts are being loaded, and those that
/// wait for a person.
struct Listed {
    due: usize,
    parked: Vec<Parked>,
}

/// A rollout to drive, loaded (or why not, with its id), and whether its plan file changed.
struct Ready {
    loaded: Result<Loaded, (String, EngineError)>,
    plan_changed: bool,
}

/// How many rollouts are loaded at once at resume: one per core, a few at most (a load is a
/// store read and, once per plan, a parse).
fn loaders() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4))
}

/// Loads the rollouts to drive on [`loaders`] threads, sending each as it is ready (until the
/// runner stops listening).
fn load_due(store: &Store, due: Vec<Due>, ready: &mpsc::Sender<Ready>) {
    let queue = std::sync::Mutex::new(due.into_iter());
    let next = || {
        queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .next()
    };
    let files = engine::PlanFiles::default();
    std::thread::scope(|scope| {
        for _ in 0..loaders() {
            scope.spawn(|| {
                while let Some(due) = next() {
                    let id = due.id().to_string();
                    let loaded = due
                        .decode()
                        .and_then(|stored| engine::load_stored(store, stored));
                    let plan_changed = loaded.as_ref().is_ok_and(|l| {
                        !finished(l.stored.rollout.status)
                            && files.changed(&l.plan_record, &l.stored.rollout)
                    });
                    let loaded = loaded.map_err(|e| (id, e));
                    if ready
                        .blocking_send(Ready {
                            loaded,
                            plan_changed,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
}

fn resume_plan(store: &Store, settings: &Settings) -> Result<Resume, EngineError> {
    if let Some(id) = &settings.only {
        return Ok(Resume {
            due: vec![Due::Read(Box::new(store.rollout(id)?))],
            parked: Vec::new(),
        });
    }
    let mut resume = Resume {
        due: Vec::new(),
        parked: Vec::new(),
    };
    for listed in store.glances()? {
        let rollout = &listed.glance;
        if finished(rollout.status) && rollout.pending == 0 {
            continue;
        } else if settings.until == Until::Shutdown && waits_for_a_person(rollout) {
            resume.parked.push(Parked {
                id: rollout.id.clone(),
                hash: rollout.plan_hash.clone(),
                file: rollout.plan_file.clone(),
                waiting: rollout.plan_change.as_ref().map(|(hash, _)| hash.clone()),
            });
        } else {
            resume.due.push(Due::Listed(listed));
        }
    }
    Ok(resume)
}

/// Nothing is due for this rollout until a person acts, whatever its plan and the time: nothing
/// is pending, no exception of it is to end (an end is a deadline in every status), and its
/// status stops it ([`Engine::next_work`] stops before reading the plan's
/// schedule). Its actor would do nothing but look at its plan file.
fn waits_for_a_person(rollout: &RolloutGlance) -> bool {
    rollout.pending == 0
        && rollout.exceptions == 0
        && engine::stops(rollout.status, rollout.hold_expired)
        && !rollout
            .plan_change
            .as_ref()
            .is_some_and(|(_, approved)| *approved)
}

/// A rollout that waits for a person: what its plan file is compared with.
struct Parked {
    id: String,
    hash: String,
    /// The plan its file is recorded to hold instead, if any.
    file: Option<String>,
    /// The plan change waiting for approval, if any.
    waiting: Option<String>,
}

/// Looks at the plan files of the rollouts that wait for a person, as their actors would at
/// start, and has the runner drive each whose file now holds another plan (the actor adopts it)
/// or whose stored plan cannot be read (the actor says why).
async fn sweep_plan_files(store: Arc<Store>, parked: Vec<Parked>, control: mpsc::Sender<Control>) {
    let (mut changed, files) = (0usize, engine::PlanFiles::default());
    for (
        n,
        Parked {
            id,
            hash,
            file,
            waiting,
        },
    ) in parked.iter().enumerate()
    {
        if n % 64 == 63 {
            tokio::task::yield_now().await;
        }
        let drive = match store.plan(id, hash) {
            Ok(record) => files.differs(&record, hash, file.as_deref(), waiting.as_deref()),
            Err(_) => true,
        };
        if drive {
            changed += 1;
            let watch = Control::Watch { id: id.clone() };
            if control.send(watch).await.is_err() {
                return;
            }
        }
    }
    tracing::info!(
        rollouts = parked.len(),
        changed,
        "looked at the plan files of the rollouts waiting for a person"
    );
}

/// Held by every actor started at resume until it has decided its first step; when the last
/// one lets go, the runner has resumed.
struct Resuming {
    shared: Arc<Shared>,
    driven: usize,
    waiting: usize,
    /// Shut down before every rollout was loaded: not resumed.
    given_up: std::sync::atomic::AtomicBool,
}

impl Drop for Resuming {
    fn drop(&mut self) {
        if self.given_up.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let took = self.shared.created.elapsed();
        tracing::info!(
            driven = self.driven,
            waiting = self.waiting,
            took_ms = took.as_millis() as u64,
            "resumed: every rollout that can move has its actor"
        );
        self.shared.resumed.send_replace(true);
    }
}

/// How an actor starts: from its rollout loaded at resume (and whether its plan file changed),
/// holding the runner's resume; or else from the store.
#[derive(Default)]
struct Start {
    loaded: Option<Result<Loaded, (String, EngineError)>>,
    plan_changed: bool,
    resuming: Option<Arc<Resuming>>,
}

fn finished(status: RolloutStatus) -> bool {
    matches!(status, RolloutStatus::Completed | RolloutStatus::Aborted)
}

type WorkFuture = Pin<Box<dyn Future<Output = Returned> + Send>>;

/// What comes back from work in flight: the provider (or why it could not connect) and the
/// outcome.
enum Returned {
    Connected(Result<Box<dyn Provider>, String>),
    Worked(Box<dyn Provider>, Box<Finished>),
    Advanced(Box<dyn Provider>, Result<(), String>),
}

/// The owner of one rollout.
struct Actor {
    shared: Arc<Shared>,
    id: String,
    inbox: mpsc::Receiver<Command>,
    stop: watch::Receiver<bool>,
    provider: Option<Box<dyn Provider>>,
    /// The rollout's lease under `serve` with replicas, confirmed before each effect and asked
    /// by the provider before each write to a tenant that cannot be fenced.
    lease: Option<Arc<LeaseGuard>>,
    in_flight: Option<WorkFuture>,
    skip: Skips,
    /// The backend's clock as last seen, for commands while the provider is busy or absent.
    last_now: Timestamp,
    /// Whether `last_now` has taken in the provider's offline clock (read only when needed).
    offline_read: bool,
    /// Automatic steps since the last outside input.
    steps: u32,
    start: Start,
}

impl Actor {
    fn new(
        shared: Arc<Shared>,
        id: String,
        inbox: mpsc::Receiver<Command>,
        stop: watch::Receiver<bool>,
        start: Start,
    ) -> Actor {
        let lease = shared
            .settings
            .leasing
            .as_ref()
            .map(|leasing| Arc::new(LeaseGuard::new(shared.store.clone(), &id, leasing.lease)));
        Actor {
            shared,
            id,
            inbox,
            stop,
            provider: None,
            lease,
            in_flight: None,
            skip: Skips::default(),
            last_now: Timestamp::from_millis(0),
            offline_read: false,
            steps: 0,
            start,
        }
    }

    async fn run(mut self) -> Ended {
        let (loaded, plan_changed) = match self.start.loaded.take() {
            Some(loaded) => (loaded.map_err(|(_, e)| e), self.start.plan_changed),
            None => {
                let loaded = engine::load(&self.shared.store, &self.id);
                let changed = loaded
                    .as_ref()
                    .is_ok_and(|l| engine::plan_file_changed(&l.plan_record, &l.stored.rollout));
                (loaded, changed)
            }
        };
        let mut loaded = match loaded {
            Ok(loaded) => loaded,
            Err(e) => return self.failed(None, &e),
        };
        self.last_now = loaded.stored.rollout.updated_at;
        let shared = self.shared.clone();
        let engine = shared.engine();
        if !finished(loaded.stored.rollout.status) && plan_changed {
            let now = self.now(&loaded);
            let mut seen = |_: &crate::domain::plan::Plan,
                            rollout: &crate::domain::rollout::Rollout,
                            record: &EventRecord| {
                shared.announce_rollout(rollout, record);
            };
            if let Err(e) = engine.notice_plan_change(&mut loaded, now, &mut seen) {
                tracing::warn!(rollout = %self.id, error = %e, "the changed plan file is not adopted");
            }
        }
        let limits = self.shared.settings.limits;
        let until = self.shared.settings.until;
        let once = self.shared.settings.once;
        loop {
            let mut wake: Option<Duration> = None;
            // Undeliverable notifications whose rest is over are tried again (bounded backoff).
            let retry_at = self.skip.release(Instant::now());
            if self.in_flight.is_none() && !*self.stop.borrow() {
                match self.step(&engine, &mut loaded) {
                    Ok(Next::Busy) => {}
                    Ok(Next::Again) => continue,
                    Ok(Next::Sleep(d)) if once => {
                        let _ = d;
                        return self.ended(Some(loaded.stored.rollout.status), None);
                    }
                    Ok(Next::Sleep(d)) => wake = Some(d),
                    Ok(Next::Idle) if until == Until::Idle || once => {
                        return self.ended(Some(loaded.stored.rollout.status), None);
                    }
                    Ok(Next::Idle)
                        if finished(loaded.stored.rollout.status)
                            && loaded.stored.rollout.pending.is_empty() =>
                    {
                        return self.ended(Some(loaded.stored.rollout.status), None);
                    }
                    Ok(Next::Idle) => wake = Some(Duration::MAX),
                    Err(e) => {
                        return self.failed(Some(loaded.stored.rollout.status), &e);
                    }
                }
            }
            if *self.stop.borrow() && self.in_flight.is_none() {
                return self.ended(Some(loaded.stored.rollout.status), None);
            }
            // Working, sleeping until a deadline, or idle: this rollout is resumed.
            self.start.resuming = None;
            let sleep = wake.map(|d| d.min(Duration::from_secs(30 * 86_400)));
            let sleep = match (sleep, retry_at) {
                (Some(d), Some(at)) => Some(d.min(at.saturating_duration_since(Instant::now()))),
                (sleep, _) => sleep,
            };
            tokio::select! {
                biased;
                Some(command) = self.inbox.recv() => {
                    self.steps = 0;
                    let answer = self.command(&engine, &mut loaded, command.kind, command.plan, &command.by, &command.reason);
                    let _ = command.reply.send(answer);
                }
                returned = poll_in_flight(&mut self.in_flight) => {
                    self.steps = 0;
                    self.in_flight = None;
                    if let Err(e) = self.returned(&engine, &mut loaded, returned) {
                        return self.failed(Some(loaded.stored.rollout.status), &e);
                    }
                }
                () = sleep_for(sleep), if sleep.is_some() => {
                    self.steps = 0;
                }
                _ = self.stop.changed(), if self.in_flight.is_none() => {}
            }
            if self.steps > limits.steps_per_drive {
                return self.ended(
                    Some(loaded.stored.rollout.status),
                    Some("the rollout took more steps than one input allows; stopping (this is a bug)".into()),
                );
            }
        }
    }

    fn ended(&self, status: Option<RolloutStatus>, error: Option<String>) -> Ended {
        Ended {
            id: self.id.clone(),
            status,
            error,
            fenced: false,
        }
    }

    /// Ended on an error (fenced: the lease was lost).
    fn failed(&self, status: Option<RolloutStatus>, error: &EngineError) -> Ended {
        Ended {
            fenced: is_fenced(error),
            ..self.ended(status, Some(error.to_string()))
        }
    }

    /// The backend's time as known without calling it: the connected provider's clock, else the
    /// clock the provider keeps offline (a simulated tenant's, in the store; read once, when
    /// first needed), never before the rollout's last event.
    fn now(&mut self, loaded: &Loaded) -> Timestamp {
        if let Some(provider) = &self.provider {
            return provider.now().max(self.last_now);
        }
        if !self.offline_read {
            self.offline_read = true;
            if let Some(at) =
                provider::offline_now(&loaded.plan.provider, &self.shared.store, loaded)
            {
                self.last_now = self.last_now.max(at);
            }
        }
        self.last_now
    }

    /// Decides and starts the next piece of work, or says how long to rest.
    fn step(&mut self, engine: &Engine<'_>, loaded: &mut Loaded) -> Result<Next, EngineError> {
        self.steps += 1;
        // Without a provider this only tells whether anything is to be done, which does not
        // depend on the time (pending effects, a status that stops, a plan with something to
        // watch): the time is taken from the backend below, so no clock is read for a rollout
        // that has nothing to do.
        let known = self
            .provider
            .as_ref()
            .map_or(self.last_now, |p| p.now())
            .max(self.last_now);
        let work = engine.next_work(loaded, known, &self.skip);
        let deadline = machine::exception_deadline(&loaded.stored.rollout);
        if let (Work::Stop(_), None) = (&work, deadline) {
            return Ok(Next::Idle);
        }
        let Some(provider) = self.provider.take() else {
            self.connect(loaded);
            return Ok(Next::Busy);
        };
        let now = provider.now().max(self.last_now);
        self.last_now = now;
        // Decide again on the backend's own clock.
        let work = engine.next_work(loaded, now, &self.skip);
        match work {
            // It waits for a person, but an exception of it ends at its time: a daemon sleeps
            // until then on a real tenant's clock (`next_work` ticks one already due). A virtual
            // clock is not moved on for a rollout that waits for a person.
            Work::Stop(_) => match deadline {
                Some(at)
                    if self.shared.settings.until == Until::Shutdown && !provider.is_virtual() =>
                {
                    let rest = provider.real_time_until(at);
                    self.provider = Some(provider);
                    Ok(Next::Sleep(rest))
                }
                _ => {
                    self.provider = Some(provider);
                    Ok(Next::Idle)
                }
            },
            Work::Wait(at) if provider.is_virtual() && !self.shared.settings.once => {
                self.in_flight = Some(Box::pin(advance(provider, at)));
                Ok(Next::Busy)
            }
            Work::Wait(at) => {
                let rest = provider.real_time_until(at);
                self.provider = Some(provider);
                Ok(Next::Sleep(rest))
            }
            Work::Tick(at) => {
                self.provider = Some(provider);
                match engine.tick(loaded, at.max(now))? {
                    Some(record) => {
                        self.shared.announce(loaded, &record);
                        Ok(Next::Again)
                    }
                    None => Ok(Next::Sleep(self.shared.settings.limits.idle_wait)),
                }
            }
            work => {
                if matches!(work, Work::Effect(_) | Work::Deliver(_)) {
                    self.confirm_lease()?;
                }
                let task = engine.task(loaded, work)?;
                let notifier = self.shared.notifier;
                let (mutated, record) = engine.confirm_before_acting(loaded, &task, now)?;
                if mutated {
                    if let Some(record) = record {
                        self.shared.announce(loaded, &record);
                    }
                    self.in_flight = Some(Box::pin(async move {
                        let mut provider = provider;
                        let _ = task.perform(provider.as_mut(), notifier).await;
                        Returned::Advanced(provider, Ok(()))
                    }));
                    return Ok(Next::Busy);
                }
                self.in_flight = Some(Box::pin(async move {
                    let mut provider = provider;
                    let finished = task.perform(provider.as_mut(), notifier).await;
                    Returned::Worked(provider, Box::new(finished))
                }));
                Ok(Next::Busy)
            }
        }
    }

    /// A replica acts on the tenant (or a channel) only while it still holds the rollout's lease
    /// at its epoch, checked in the database right before: one woken from a pause past its lease
    /// ends here, as if fenced, instead of writing what the new owner may have written already.
    fn confirm_lease(&self) -> Result<(), EngineError> {
        let Some(lease) = &self.lease else {
            return Ok(());
        };
        if lease.confirm()? {
            return Ok(());
        }
        crate::metrics::global().fenced(true);
        let epoch = self.shared.store.leases().ok().and_then(|all| {
            all.into_iter()
                .find(|l| l.rollout == self.id)
                .map(|l| l.epoch)
        });
        Err(EngineError::Store(crate::store::StoreError::Fenced {
            id: self.id.clone(),
            epoch: epoch.unwrap_or(0),
        }))
    }

    fn connect(&mut self, loaded: &Loaded) {
        let settings = loaded.plan.provider.clone();
        let store = self.shared.store.clone();
        self.in_flight = Some(Box::pin(async move {
            Returned::Connected(
                provider::connect(&settings, &store)
                    .await
                    .map_err(|e| e.to_string()),
            )
        }));
    }

    fn returned(
        &mut self,
        engine: &Engine<'_>,
        loaded: &mut Loaded,
        returned: Returned,
    ) -> Result<(), EngineError> {
        match returned {
            Returned::Connected(Ok(mut provider)) => {
                self.last_now = self.last_now.max(provider.now());
                if let Some(leasing) = &self.shared.settings.leasing
                    && let Some((_, epoch)) = self
                        .shared
                        .store
                        .held_leases()
                        .into_iter()
                        .find(|(id, _)| *id == self.id)
                {
                    provider.fence_writes(crate::store::WriteFence {
                        rollout: self.id.clone(),
                        replica: leasing.replica.clone(),
                        epoch,
                    });
                }
                if let Some(lease) = &self.lease {
                    provider.guard_writes(lease.clone());
                }
                self.provider = Some(provider);
            }
            Returned::Connected(Err(error)) => {
                // Recorded like any provider failure: the rollout says why it stopped.
                let event = Event {
                    kind: EventKind::ProviderFailed {
                        effect: None,
                        error: format!("connecting: {error}"),
                    },
                    trigger: Trigger::new(
                        crate::domain::event::TriggerSource::Provider,
                        &self.shared.settings.actor,
                        "connect",
                    ),
                };
                let now = self.now(loaded);
                match engine.apply(loaded, event, now, None) {
                    Ok(Some(record)) => self.shared.announce(loaded, &record),
                    Ok(None) => {}
                    Err(EngineError::Rejected(_)) => {}
                    Err(e) => return Err(e),
                }
                return Err(EngineError::Invalid(error));
            }
            Returned::Worked(provider, finished) => {
                self.last_now = self.last_now.max(finished.now);
                self.provider = Some(provider);
                self.skip.note(&finished);
                if let Some((effect, outcome)) = finished.event.as_ref().and_then(classify) {
                    crate::metrics::global().effect(effect, outcome, finished.took);
                }
                if let Some(record) = engine.conclude(loaded, *finished)? {
                    self.shared.announce(loaded, &record);
                }
            }
            Returned::Advanced(provider, result) => {
                self.last_now = self.last_now.max(provider.now());
                self.provider = Some(provider);
                result.map_err(EngineError::Invalid)?;
                crate::crash::point("clock.advanced");
            }
        }
        Ok(())
    }

    fn command(
        &mut self,
        engine: &Engine<'_>,
        loaded: &mut Loaded,
        kind: EventKind,
        plan: Option<(String, String)>,
        by: &str,
        reason: &str,
    ) -> Result<Option<EventRecord>, EngineError> {
        // The record on disk is the truth (a command may have been recorded by another front end
        // while this one was idle).
        *loaded = engine::load(&self.shared.store, &self.id)?;
        let now = self.now(loaded);
        let record = match plan {
            Some((file, source)) => engine.apply_plan(loaded, &file, source, by, reason, now)?,
            None => engine.command(loaded, kind, by, reason, now)?,
        };
        if let Some(record) = &record {
            self.shared.announce(loaded, record);
            // A decision may unblock what was skipped.
            self.skip = Skips::default();
        }
        Ok(record)
    }
}

/// What an actor does after deciding.
enum Next {
    /// Work is in flight.
    Busy,
    /// Decide again at once (a step was taken without I/O).
    Again,
    /// Nothing until this much real time has passed (or an input arrives).
    Sleep(Duration),
    /// Nothing without a person.
    Idle,
}

/// The effect (or observation) an outcome is about, and how it went, for the metrics.
fn classify(event: &Event) -> Option<(&'static str, &'static str)> {
    Some(match &event.kind {
        EventKind::BaselineCaptured { .. } => ("capture_baseline", "done"),
        EventKind::Reconciled { .. } => ("reconcile", "done"),
        EventKind::DriftDetected {
            effect: Some(_), ..
        } => ("reconcile", "drifted"),
        EventKind::DriftDetected { effect: None, .. } => ("observe", "drifted"),
        EventKind::TenantApprovalPending { .. } => ("reconcile", "held"),
        EventKind::ProviderFailed {
            effect: Some(_), ..
        } => ("reconcile", "failed"),
        EventKind::ProviderFailed { effect: None, .. } => ("observe", "failed"),
        EventKind::Observed { .. } => ("observe", "done"),
        EventKind::Delivered { .. } => ("notify", "done"),
        _ => return None,
    })
}

async fn advance(mut provider: Box<dyn Provider>, at: Timestamp) -> Returned {
    let result = provider.advance_to(at).await.map_err(|e| e.to_string());
    Returned::Advanced(provider, result)
}

async fn poll_in_flight(work: &mut Option<WorkFuture>) -> Returned {
    match work {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

async fn sleep_for(duration: Option<Duration>) {
    match duration {
        Some(d) if d < Duration::from_secs(365 * 86_400) => tokio::time::sleep(d).await,
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
