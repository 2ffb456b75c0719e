//! Commands for a store's keeping and its damage: `export` (a snapshot an auditor keeps),
//! `verify` (the store against heads kept elsewhere), `restore-tenant` (a rollout's baseline put
//! back from an export when the store cannot be read) and `restore-store` (a store rebuilt from
//! an export). See docs/operations.md, "A damaged store".

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::commands::Context;
use super::view::Text;
use super::{CommandResult, Failure, Output, exit};
use crate::domain::plan::{self, Strictness};
use crate::domain::rollout::RolloutStatus;
use crate::domain::time::Timestamp;
use crate::provider::{self, Outcome, Provider};
use crate::store::{self, ChainHead, DEFAULT_LOCK_WAIT, Export, ExportError, Store, StoreError};

fn print_json<T: Serialize>(value: &T) {
    say!(
        "{}",
        serde_json::to_string_pretty(value).expect("views always serialize")
    );
}

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

impl From<ExportError> for Failure {
    fn from(err: ExportError) -> Failure {
        match err {
            ExportError::Store(err) => Failure::from(err),
            other => Failure::invalid(other.to_string()),
        }
    }
}

/// `phasegate export --to FILE`: every rollout with its plan, baseline, trail and chain head.
pub async fn export(ctx: &Context, to: &Path) -> CommandResult {
    let export = match ctx.remote()? {
        // A daemon holds the store: it takes the snapshot between its commits.
        Some(remote) => {
            let answer = remote.get("/api/v1/export").await?;
            let bytes = serde_json::to_vec(&answer).unwrap_or_default();
            Export::from_json(&bytes).map_err(|e| Failure {
                code: exit::FAILURE,
                message: format!("the daemon's export: {e}"),
            })?
        }
        None => Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?.export(now())?,
    };
    export.write(to)?;
    match ctx.output {
        Output::Json => print_json(&serde_json::json!({
            "file": to.display().to_string(),
            "store": export.store,
            "digest": export.digest,
            "heads": export.heads,
        })),
        Output::Text => {
            say!(
                "exported store {} to {} (digest {})",
                export.store,
                to.display(),
                export.digest
            );
            for head in &export.heads {
                say!(
                    "  {}  event {}  {}",
                    Text(&head.rollout),
                    head.seq,
                    head.hash
                );
            }
        }
    }
    Ok(exit::OK)
}

/// Chain heads from a file: an export, a JSON array of heads, or JSON lines each a head or a
/// notification carrying one (`chainHead`), as a webhook receiver keeps them.
fn read_heads(file: &Path) -> Result<Vec<ChainHead>, Failure> {
    let bytes = std::fs::read(file)
        .map_err(|e| Failure::invalid(format!("{}: cannot read: {e}", file.display())))?;
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes)
        && value.get("phasegate_export").is_some()
    {
        return Ok(Export::read(file)?.heads);
    }
    if let Ok(heads) = serde_json::from_slice::<Vec<ChainHead>>(&bytes) {
        return Ok(heads);
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut heads = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            Failure::invalid(format!(
                "{}:{}: neither an export, nor a list of chain heads, nor JSON lines: {e}",
                file.display(),
                n + 1
            ))
        })?;
        let head = value.get("chainHead").cloned().unwrap_or(value);
        heads.push(serde_json::from_value(head).map_err(|e| {
            Failure::invalid(format!(
                "{}:{}: not a chain head: {e}",
                file.display(),
                n + 1
            ))
        })?);
    }
    Ok(heads)
}

/// `phasegate verify --against FILE`: the store still holds, unchanged, every event the heads
/// kept outside it name. Exit 1 on any divergence.
pub fn verify(ctx: &Context, against: &Path) -> CommandResult {
    let heads = read_heads(against)?;
    if heads.is_empty() {
        return Err(Failure::invalid(format!(
            "{}: holds no chain heads",
            against.display()
        )));
    }
    let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
    let found = store.check_heads(&heads)?;
    match ctx.output {
        Output::Json => print_json(&serde_json::json!({
            "store": store.id(),
            "heads": heads.len(),
            "verified": found.is_empty(),
            "divergences": found,
        })),
        Output::Text if found.is_empty() => say!(
            "store {}: {} chain head{} checked, history matches",
            store.id(),
            heads.len(),
            if heads.len() == 1 { "" } else { "s" }
        ),
        Output::Text => {
            for line in &found {
                eprintln!("{}", Text(line));
            }
            eprintln!(
                "store {}: {} of {} chain heads diverge",
                store.id(),
                found.len(),
                heads.len()
            );
        }
    }
    Ok(if found.is_empty() {
        exit::OK
    } else {
        exit::FAILURE
    })
}

/// `phasegate restore-store --from FILE`: rebuilds the store from a full export into an empty
/// store directory.
pub fn restore_store(ctx: &Context, from: &Path) -> CommandResult {
    let export = Export::read(from)?;
    store::import(&ctx.store, &export)?;
    let store = Store::open(&ctx.store, DEFAULT_LOCK_WAIT)?;
    let found = store.check_heads(&export.heads)?;
    if !found.is_empty() {
        return Err(Failure {
            code: exit::FAILURE,
            message: format!("the rebuilt store does not verify: {}", found.join("; ")),
        });
    }
    say!(
        "store {} rebuilt in {} from {} ({} rollouts, as of {}); `phasegate status` shows where each stands",
        store.id(),
        store::display_location(&ctx.store),
        from.display(),
        export.rollouts.len(),
        export.exported_at
    );
    Ok(exit::OK)
}

/// `phasegate store copy --from A --to B`: a consistent export of `A` (which must not be in use)
/// loaded into the empty store `B` in one go, keeping the store's identity; then every chain of
/// `B` is verified against the heads `A` had.
pub fn store_copy(from: &Path, to: &Path) -> CommandResult {
    let source = Store::open(from, DEFAULT_LOCK_WAIT)?;
    let export = source.export(now())?;
    drop(source);
    store::import(to, &export)?;
    let copy = Store::open(to, DEFAULT_LOCK_WAIT)?;
    let mut found = copy.check_heads(&export.heads)?;
    let mut events = 0;
    for head in &export.heads {
        match copy.verify(&head.rollout)? {
            Ok(n) => events += n,
            Err(e) => found.push(format!("{}: {e}", head.rollout)),
        }
    }
    if !found.is_empty() {
        return Err(Failure {
            code: exit::FAILURE,
            message: format!("the copy does not verify: {}", found.join("; ")),
        });
    }
    say!(
        "store {} copied from {} to {}: {} rollouts, {events} events, every chain verified",
        copy.id(),
        store::display_location(from),
        store::display_location(to),
        export.heads.len(),
    );
    Ok(exit::OK)
}

/// Refuses when the store can be read and holds the rollout: `abort` restores the baseline and
/// records it. Never creates a store where there is none.
fn refuse_if_store_is_usable(ctx: &Context, export: &Export, id: &str) -> Result<(), Failure> {
    if !store::is_postgres(&ctx.store) && !ctx.store.join("sled").exists() {
        return Ok(());
    }
    match Store::open(&ctx.store, Duration::ZERO) {
        Ok(store) if store.id() == export.store && store.rollout(id).is_ok() => {
            Err(Failure::invalid(format!(
                "the store {} is readable and holds `{id}`: `phasegate abort {id}` restores its baseline and records it in the audit trail",
                store::display_location(&ctx.store)
            )))
        }
        Err(err @ StoreError::InUse { .. }) => Err(Failure::from(err)),
        _ => Ok(()),
    }
}

async fn connect(plan: &plan::Plan, store_id: &str) -> Result<Box<dyn Provider>, Failure> {
    let config = &plan.provider;
    let failure = |message: String| Failure {
        code: exit::FAILURE,
        message,
    };
    match config.kind.as_str() {
        kind if kind == provider::graph::settings::KIND.name => {
            let settings = provider::graph::settings::of(config).map_err(Failure::invalid)?;
            let graph = provider::graph::GraphProvider::connect(settings, store_id, None)
                .await
                .map_err(|e| failure(format!("cannot connect to the tenant: {e}")))?;
            Ok(Box::new(graph))
        }
        kind if kind == provider::simulator::settings::KIND.name => Err(Failure::invalid(
            "a simulated tenant lives in the store's database and is lost with it: rebuild the store from a full export (`phasegate restore-store --from FILE` into an empty store directory), then `phasegate abort ID` and `phasegate run ID`",
        )),
        other => Err(Failure::invalid(format!("no provider of kind `{other}`"))),
    }
}

#[derive(Serialize)]
struct Restored {
    rollout: String,
    restored: bool,
    changes: u64,
    drift: Vec<String>,
    held: Option<String>,
}

/// `phasegate restore-tenant --from FILE ROLLOUT`: puts back the baseline of a rollout from an
/// export or recovery kit, through the provider its plan names, without the store. The
/// provider's own rules hold: only what phasegate changed goes back, and anything someone else
/// changed since stops it with nothing written.
pub async fn restore_tenant(ctx: &Context, from: &Path, id: &str) -> CommandResult {
    let export = Export::read(from)?;
    let Some(backup) = export.rollout(id) else {
        let known: Vec<&str> = export.rollouts.iter().map(|r| r.id.as_str()).collect();
        return Err(Failure::invalid(format!(
            "no rollout `{id}` in {} (it holds: {})",
            from.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    };
    refuse_if_store_is_usable(ctx, &export, id)?;
    let Some(record) = &backup.record else {
        say!(
            "{id}: no baseline was captured, so phasegate changed nothing in the tenant: nothing to restore"
        );
        return Ok(exit::OK);
    };
    let plan = plan::check(&backup.plan.path, &backup.plan.source, Strictness::Lenient)
        .map_err(|errors| Failure::invalid(format!("the exported plan: {errors}")))?;
    let mut provider = connect(&plan, &export.store).await?;
    let status = backup.stored.rollout.status;
    tracing::warn!(rollout = %id, from = %from.display(), status = %status, "restoring the tenant to the rollout's baseline without the store");
    let outcome = provider
        .restore(&plan.policy, record)
        .await
        .map_err(|e| Failure {
            code: exit::FAILURE,
            message: format!("{id}: the tenant was not restored: {e}"),
        })?;
    let result = match outcome {
        Outcome::Done { changes, .. } => Restored {
            rollout: id.to_string(),
            restored: true,
            changes,
            drift: vec![],
            held: None,
        },
        Outcome::Drifted { changes } => Restored {
            rollout: id.to_string(),
            restored: false,
            changes: 0,
            drift: changes.iter().map(ToString::to_string).collect(),
            held: None,
        },
        Outcome::Held { request, .. } => Restored {
            rollout: id.to_string(),
            restored: false,
            changes: 0,
            drift: vec![],
            held: Some(format!("{} ({})", request.summary, request.reference)),
        },
    };
    match ctx.output {
        Output::Json => print_json(&result),
        Output::Text => print_restored(&result, &backup.stored.rollout.status, &export),
    }
    Ok(if result.restored {
        exit::OK
    } else {
        exit::ATTENTION
    })
}

fn print_restored(result: &Restored, status: &RolloutStatus, export: &Export) {
    let id = Text(&result.rollout);
    if result.restored {
        say!(
            "{id}: tenant restored to the baseline ({} change{}); the rollout was {status} when the backup was taken ({})",
            result.changes,
            if result.changes == 1 { "" } else { "s" },
            export.exported_at
        );
        say!("this restore is in no audit trail: keep this output with the incident");
    } else if let Some(held) = &result.held {
        say!("{id}: the tenant holds the restore for another administrator's approval: {held}");
    } else {
        say!(
            "{id}: not restored — someone else changed what the rollout manages since phasegate last wrote it; nothing was written:"
        );
        for change in &result.drift {
            say!("  {}", Text(change));
        }
    }
}
