//! `exception grant` and `exception revoke`: recorded like every command, with no provider
//! call (through the daemon's API when one holds the store); `run` carries out the reconcile
//! they queue while an enforce phase is applied.

use super::commands::{Context, print_decision, submit};
use super::{CommandResult, exit};
use crate::domain::event::EventKind;
use crate::domain::machine;

/// Who an exception is for, as the command line gives it.
pub struct Grant {
    pub name: String,
    pub user: Option<String>,
    pub group: Option<String>,
    pub until: String,
}

pub async fn grant(ctx: &Context, id: &str, by: &str, reason: &str, grant: Grant) -> CommandResult {
    let subject =
        machine::subject(grant.user.as_deref(), grant.group.as_deref()).map_err(to_failure)?;
    let until = machine::parse_until(&grant.until).map_err(to_failure)?;
    let body = serde_json::json!({
        "name": grant.name,
        "user": grant.user,
        "group": grant.group,
        "until": grant.until,
    });
    let name = grant.name;
    submit(ctx, id, by, reason, ("exceptions", body), move |_| {
        Ok(EventKind::ExceptionGranted {
            name,
            subject,
            until,
        })
    })
    .await
}

pub async fn revoke(ctx: &Context, id: &str, by: &str, reason: &str, name: &str) -> CommandResult {
    if let Some(remote) = ctx.remote()? {
        let mut body = serde_json::json!({ "reason": reason });
        if remote.local {
            body["by"] = serde_json::json!(by);
        }
        let path = format!("/api/v1/rollouts/{id}/exceptions/{}", path_segment(name));
        let view = remote.delete(&path, &body).await?;
        print_decision(ctx, id, &view);
        return Ok(exit::OK);
    }
    let name = name.to_string();
    submit(
        ctx,
        id,
        by,
        reason,
        ("", serde_json::Value::Null),
        move |_| Ok(EventKind::ExceptionRevoked { name }),
    )
    .await
}

/// An exception's name in a URL path: names are letters, digits, `-` and `_`; anything else
/// is percent-encoded so that the daemon refuses it as a name rather than as a path.
fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn to_failure(rejection: machine::Rejection) -> super::Failure {
    super::Failure::from(crate::engine::EngineError::from(rejection))
}
