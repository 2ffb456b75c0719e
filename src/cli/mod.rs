//! The command line: parsing (clap), the exit-code contract, and text or JSON output.
//!
//! Exit codes are part of the contract with automation: 0 ok, 1 failure, 2 invalid input (bad
//! plan, unknown rollout, a command the rollout's state does not allow), 3 a rollout needs
//! attention (waiting for approval, held, rolled back, rejected, aborted), 4 the store (or, on
//! PostgreSQL, the rollout) is in use by another process,
//! 5 the readiness preflight found an error.
//! Logs go to stderr through tracing (`RUST_LOG`); stdout carries only the command's output.

/// Writes a line to stdout; a reader that went away (`| head`, a closed pipe) is not an error
/// worth dying for, least of all in a daemon.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// [`say!`] without the newline.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

pub(crate) mod commands;
pub use commands::status_text;
mod demo;
mod exception;
mod recovery;
mod remote;
pub mod text;
pub mod view;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::domain::event::DriftResolution;
use crate::engine::EngineError;
use crate::store::StoreError;

/// Exit codes; see the module documentation.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const INVALID: u8 = 2;
    pub const ATTENTION: u8 = 3;
    pub const STORE_IN_USE: u8 = 4;
    /// The readiness preflight found an error: the tenant is not ready for the plan.
    pub const NOT_READY: u8 = 5;
}

#[derive(Parser, Debug)]
#[command(
    name = "phasegate",
    version,
    about = "Staged, gated, resumable rollouts of device-compliance and access policies",
    long_about = None
)]
pub struct Cli {
    /// Store directory, or a PostgreSQL database as `postgres://user@host:port/db` (password in
    /// PGPASSWORD or the URL) [default: $PHASEGATE_STORE, else the per-user data directory]
    #[arg(long, global = true, env = "PHASEGATE_STORE", value_name = "DIR|URL")]
    store: Option<PathBuf>,
    /// Output format
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Talk to the phasegate serve at this URL (token in PHASEGATE_TOKEN) instead of the store
    #[arg(long, global = true, env = "PHASEGATE_SERVER", value_name = "URL")]
    server: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

// Parsed once per process: the size of its largest variant (`emulator`'s flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Check or show rollout plans
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Freeze windows: override the one in force
    #[command(subcommand)]
    Freeze(FreezeCommand),
    /// Exceptions from enforcement: grant one until a time, or revoke it
    #[command(subcommand)]
    Exception(ExceptionCommand),
    /// Create a rollout from a plan; prints its id
    Start {
        /// The plan file
        file: PathBuf,
        /// Rollout id [default: <plan name>-<n>]
        #[arg(long)]
        id: Option<String>,
        /// Who starts it [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// Refuse a plan with warnings, as `plan check --strict` does
        #[arg(long)]
        strict: bool,
        /// Start even if the readiness preflight finds errors (needs --reason, which the audit
        /// trail records)
        #[arg(long, requires = "reason")]
        skip_preflight: bool,
        /// Why the preflight is skipped, for the audit trail
        #[arg(long, requires = "skip_preflight")]
        reason: Option<String>,
        /// DNS server the preflight asks for the enrolment records (IP[:PORT]) [default: the
        /// plan's `[preflight] resolver`, else the system's]
        #[arg(long, value_parser = crate::preflight::settings::parse_resolver)]
        resolver: Option<std::net::SocketAddr>,
    },
    /// Check that the tenant is ready for a plan: enrolment DNS, the Apple push certificate,
    /// the policies, groups, Conditional Access, MFA and the app's permissions; exit 5 on an error
    Preflight {
        /// The plan file
        file: PathBuf,
        /// DNS server to ask for the enrolment records (IP[:PORT]) [default: the plan's
        /// `[preflight] resolver`, else the system's]
        #[arg(long, value_parser = crate::preflight::settings::parse_resolver)]
        resolver: Option<std::net::SocketAddr>,
    },
    /// Drive rollouts until each is completed or needs a person
    Run {
        /// Only this rollout [default: every rollout that can move]
        id: Option<String>,
        /// One pass over what is due now, without waiting (for cron)
        #[arg(long)]
        once: bool,
    },
    /// Show one rollout or all
    Status {
        /// Only this rollout [default: all]
        id: Option<String>,
        /// Follow the rollout live, redrawing its table at each transition
        #[arg(long, requires = "id")]
        watch: bool,
    },
    /// Drive every rollout continuously and serve the HTTP API and dashboard
    Serve {
        /// Address to listen on
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// On PostgreSQL: how long a replica's lease of a rollout lasts without renewal, on the
        /// database's clock (1s to 1h); another replica takes the rollout once it expired
        #[arg(long, default_value = "15s", value_parser = lease_duration)]
        lease: std::time::Duration,
        /// On PostgreSQL: how often a replica renews its leases and looks for unowned rollouts
        /// (1s to 1h, shorter than --lease)
        #[arg(long, default_value = "5s", value_parser = lease_duration)]
        renew_every: std::time::Duration,
        /// On PostgreSQL: the most rollouts this replica drives at once (1 to 100000)
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        max_rollouts: u32,
    },
    /// Manage API tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// List the promotions waiting for approval, with their impact forecast and digest
    Approvals {
        /// Only this rollout [default: all]
        id: Option<String>,
    },
    /// Approve the promotion of a phase (shows its impact forecast; asks first at a terminal)
    Approve {
        /// The rollout's id
        id: String,
        /// Do not ask for confirmation at a terminal (for scripts)
        #[arg(long)]
        yes: bool,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// The phase [default: the one waiting for approval]
        #[arg(long)]
        phase: Option<String>,
        /// Change ticket or request reference
        #[arg(long)]
        ticket: Option<String>,
        /// A comment for the audit trail
        #[arg(long)]
        comment: Option<String>,
        /// The approval digest this approval is for, as `approvals` shows it (for scripts): refused
        /// if the evidence has moved since. At a terminal, the digest shown is the one approved
        #[arg(long, value_name = "HEX")]
        digest: Option<String>,
    },
    /// Reject the promotion of a phase
    Reject {
        /// The rollout's id
        id: String,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// The phase [default: the one waiting for approval]
        #[arg(long)]
        phase: Option<String>,
        /// Why, for the audit trail
        #[arg(long)]
        reason: String,
    },
    /// Pause a rollout; only a person resumes it
    Pause {
        /// The rollout's id
        id: String,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// Why, for the audit trail
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume a paused, rolled back, rejected or failed rollout (or extend an expired hold)
    Resume {
        /// The rollout's id
        id: String,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// Why, for the audit trail
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Roll back to an earlier phase (by one phase unless --to is given)
    Rollback {
        /// The rollout's id
        id: String,
        /// The phase to return to [default: the one before the current phase]
        #[arg(long)]
        to: Option<String>,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// Why, for the audit trail
        #[arg(long)]
        reason: String,
    },
    /// Abort: restore the configuration from before the rollout
    Abort {
        /// The rollout's id
        id: String,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// Why, for the audit trail
        #[arg(long)]
        reason: String,
    },
    /// Decide about a drifted rollout: someone else changed what it manages
    #[command(subcommand)]
    Drift(DriftCommand),
    /// The audit trail of a rollout
    History {
        /// The rollout's id
        id: String,
        /// Check the hash chain; exit 1 if it is broken
        #[arg(long)]
        verify: bool,
    },
    /// Serve a Graph-compatible tenant for rehearsals and tests
    Emulator {
        /// Address to listen on
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Simulated devices
        #[arg(long, default_value_t = 5_000)]
        devices: u32,
        /// Seed of the simulated fleet: the same seed gives the same fleet
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Share of Graph requests that fail (429s with and without Retry-After, 503s, slow
        /// answers, connections dropped after a write), from 0 to 1
        #[arg(long, default_value_t = 0.0)]
        faults: f64,
        /// Seed of the fault schedule [default: --seed]
        #[arg(long)]
        fault_seed: Option<u64>,
        /// Run the tenant's clock this many times faster than real time [default: the clock
        /// moves only when the client asks, so rehearsals are instant]
        #[arg(long)]
        time_scale: Option<f64>,
        /// The tenant's domain
        #[arg(long, default_value = "contoso.onmicrosoft.com")]
        tenant: String,
        /// The registered application's client id
        #[arg(long, default_value = "00001111-aaaa-2222-bbbb-3333cccc4444")]
        client_id: String,
        /// The application's client secret
        #[arg(
            long,
            env = "PHASEGATE_EMULATOR_SECRET",
            default_value = "emulator-secret",
            hide_env_values = true
        )]
        client_secret: String,
        /// A certificate (PEM) registered on the application as a credential: clients may sign
        /// in with a client assertion signed by its key (repeatable)
        #[arg(long = "client-certificate", value_name = "PEM")]
        client_certificates: Vec<PathBuf>,
        /// The issuer of tokens the application trusts through a federated identity credential
        /// (workload identity federation), e.g. a Kubernetes cluster's service-account issuer
        #[arg(long, requires_all = ["federated_subject", "federated_issuer_key"])]
        federated_issuer: Option<String>,
        /// The subject those tokens must carry, e.g. system:serviceaccount:NAMESPACE:NAME
        #[arg(long, requires = "federated_issuer")]
        federated_subject: Option<String>,
        /// The issuer's public signing key (PEM), which the real service reads from the
        /// issuer's OpenID discovery document
        #[arg(long, value_name = "PEM", requires = "federated_issuer")]
        federated_issuer_key: Option<PathBuf>,
        /// Lifetime of issued access tokens, in tenant time
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        token_lifetime: std::time::Duration,
        /// Conditional Access requests allowed per second (the service allows 1 per tenant)
        #[arg(long, default_value_t = 1.0)]
        ca_rate: f64,
        /// Make each access token stop working after this many requests (rehearses a token
        /// that expires or is revoked mid-rollout)
        #[arg(long)]
        token_uses: Option<u64>,
        /// The tenant to start with: `default` (phasegate's objects only) or `lived-in` (the
        /// same fleet in a tenant other administrators have configured; see docs/emulator.md)
        #[arg(long, default_value = "default", value_parser = ["default", "lived-in"])]
        scenario: String,
        /// State of the CA policy "Require compliant device for Office 365" [default: disabled
        /// in the default scenario, enabled in lived-in]
        #[arg(long, value_parser = ["enabled", "report-only", "disabled"])]
        ca_state: Option<String>,
        /// Require Multi Admin Approval for the app's writes to compliance policies
        #[arg(long)]
        maa: bool,
        /// The MDM set-up the preflight reads: `ready`, or `unready` (an expired Apple push
        /// certificate, wipe actions, a template without a default-locale message, a missing
        /// permission; see docs/emulator.md)
        #[arg(long, default_value = "ready", value_parser = ["ready", "unready"])]
        readiness: String,
        /// When the Apple push certificate expires: `none` (not uploaded), or a duration after
        /// the tenant's clock starts (`10d`), or before it (`-2d`) [default: as --readiness says]
        #[arg(long, allow_hyphen_values = true)]
        apns_expiry: Option<String>,
        /// A custom domain the tenant has verified (repeat for more)
        #[arg(long = "verified-domain", value_name = "DOMAIN")]
        verified_domains: Vec<String>,
        /// The application roles the app's tokens carry, comma-separated [default: every
        /// permission docs/graph.md lists, less one under --readiness unready]
        #[arg(long)]
        roles: Option<String>,
    },
    /// Print a shell completion script (e.g. `phasegate completions bash > /etc/bash_completion.d/phasegate`)
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Run a complete four-phase rollout over a simulated fleet in a temporary store
    Demo {
        /// Simulated devices
        #[arg(long, default_value_t = 10_000)]
        devices: u32,
        /// Seed of the simulated fleet: the same seed gives the same fleet
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Write a consistent snapshot of the store (rollouts, plans, baselines, trails, chain
    /// heads, identity, digest) to a file to keep elsewhere
    Export {
        /// The file to write
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Check the store against chain heads kept outside it (an export, a list of heads, or the
    /// notifications a webhook received); exit 1 if history was rewritten or cut
    Verify {
        /// The export or chain-head file
        #[arg(long, value_name = "FILE")]
        against: PathBuf,
    },
    /// Put a rollout's baseline back in the tenant from an export or recovery kit, when the
    /// store cannot be read
    RestoreTenant {
        /// The export, or the rollout's recovery kit (`<store>/recovery/<rollout>.json`)
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The rollout whose baseline to restore
        id: String,
    },
    /// Rebuild a store from a full export, into an empty store directory
    RestoreStore {
        /// The export
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
    },
    /// Move a store to another backend
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Copy a store (rollouts, trails, plans, baselines, claims, tokens, provider state) with its
    /// identity into an empty store, e.g. a sled directory into a PostgreSQL database, and verify
    /// every chain of the copy
    Copy {
        /// The store to copy (a directory or a URL); no process may be using it
        #[arg(long, value_name = "DIR|URL")]
        from: PathBuf,
        /// The empty store to copy into (a directory or a `postgres://` URL)
        #[arg(long, value_name = "DIR|URL")]
        to: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token (shown once) for a person or a pipeline
    Create {
        /// Who the token is: the name the audit trail records
        #[arg(long)]
        name: String,
        /// viewer, approver, operator or admin
        #[arg(long)]
        role: String,
    },
    /// List tokens (names, roles, when created or revoked; never the tokens)
    List,
    /// Revoke every active token of this name
    Revoke {
        /// The token's name
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum DriftCommand {
    /// Write phasegate's values back over the other administrator's change, then continue
    Reapply {
        /// The rollout's id
        id: String,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// Why, for the audit trail
        #[arg(long)]
        reason: String,
    },
    /// Keep the other administrator's values (phasegate stops managing what drifted), then
    /// continue
    Adopt {
        /// The rollout's id
        id: String,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// Why, for the audit trail
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum PlanCommand {
    /// Validate plans; exit 2 if any is invalid
    Check {
        /// The plan files to check
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Treat warnings (valid but dangerous settings) as errors
        #[arg(long)]
        strict: bool,
    },
    /// Show a plan's phases, order and gates
    Show {
        /// The plan file
        file: PathBuf,
        /// text, or Graphviz dot (`| dot -Tsvg`)
        #[arg(long, value_enum, default_value_t = ShowFormat::Text)]
        format: ShowFormat,
    },
    /// Apply a plan file to a running rollout: adopted at once if it weakens nothing, else it
    /// waits for approval under the plan in force
    Apply {
        /// The rollout's id
        id: String,
        /// The plan file
        file: PathBuf,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// Why, for the audit trail
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Approve the plan change waiting on a rollout
    Approve {
        /// The rollout's id
        id: String,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// The plan change's hash (or its first 8+ digits) as shown [default: the one waiting]
        #[arg(long)]
        plan: Option<String>,
        /// Change ticket or request reference
        #[arg(long)]
        ticket: Option<String>,
        /// A comment for the audit trail
        #[arg(long)]
        comment: Option<String>,
    },
    /// Turn down (or, as whoever applied it, withdraw) the plan change waiting on a rollout
    Reject {
        /// The rollout's id
        id: String,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// The plan change's hash (or its first 8+ digits) [default: the one waiting]
        #[arg(long)]
        plan: Option<String>,
        /// Why, for the audit trail
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum FreezeCommand {
    /// Let due promotions through the freeze window in force until it ends (a person the window
    /// names in `override_by`/`override_groups`; recorded with the reason)
    Override {
        /// The rollout's id
        id: String,
        /// Who does it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// Why, for the audit trail
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum ExceptionCommand {
    /// Exempt a user or a group from enforcement until a time (owners are still told; their
    /// devices are still observed); it ends on its own
    Grant {
        /// The rollout's id
        id: String,
        /// The exception's name: 1–64 letters, digits, `-` or `_`
        name: String,
        /// The user's sign-in name (UPN)
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        user: Option<String>,
        /// The group's name, as the provider knows it
        #[arg(long)]
        group: Option<String>,
        /// When it ends: an RFC 3339 time, or a span from now such as `3d`
        #[arg(long)]
        until: String,
        /// Who grants it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// Why, for the audit trail
        #[arg(long)]
        reason: String,
    },
    /// End an exception before its time
    Revoke {
        /// The rollout's id
        id: String,
        /// The exception's name
        name: String,
        /// Who revokes it, as the audit trail records [default: the OS user]
        #[arg(long)]
        by: Option<String>,
        /// Why, for the audit trail
        #[arg(long)]
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ShowFormat {
    Text,
    Dot,
}

/// A rollout id: 1 to 100 letters, digits, `-`, `_` and `.`.
pub fn valid_rollout_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A command's failure, with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::INVALID,
            message: message.into(),
        }
    }
}

impl From<EngineError> for Failure {
    fn from(err: EngineError) -> Failure {
        let code = match &err {
            EngineError::Store(StoreError::InUse { .. }) => exit::STORE_IN_USE,
            EngineError::Store(StoreError::NotFound(_) | StoreError::AlreadyExists(_))
            | EngineError::Rejected(_)
            | EngineError::Claimed(_)
            | EngineError::Plan(_) => exit::INVALID,
            _ => exit::FAILURE,
        };
        Failure {
            code,
            message: err.to_string(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(err: StoreError) -> Failure {
        Failure::from(EngineError::Store(err))
    }
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Failure {
        match err.downcast::<StoreError>() {
            Ok(store) => Failure::from(store),
            Err(other) => Failure {
                code: exit::FAILURE,
                message: format!("{other:#}"),
            },
        }
    }
}

pub type CommandResult = Result<u8, Failure>;

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a single-threaded runtime always builds");
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("error: {}", failure.message.trim_end());
            ExitCode::from(failure.code)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_target(false)
        .init();
}

/// Colours only for a person at a terminal: never into a file or a pipe, and never when
/// `NO_COLOR` is set to anything non-empty (no-color.org).
fn colour_logs(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

async fn dispatch(cli: Cli) -> CommandResult {
    let store = cli.store.clone().unwrap_or_else(default_store);
    let ctx = commands::Context {
        store,
        output: cli.output,
        server: cli.server.clone(),
    };
    match cli.command {
        Command::Plan(PlanCommand::Check { files, strict }) => {
            commands::plan_check(&ctx, &files, strict)
        }
        Command::Plan(PlanCommand::Show { file, format }) => {
            commands::plan_show(&ctx, &file, format == ShowFormat::Dot)
        }
        Command::Plan(PlanCommand::Apply {
            id,
            file,
            by,
            reason,
        }) => commands::plan_apply(&ctx, &id, &file, &by_or_user(by)?, &reason).await,
        Command::Plan(PlanCommand::Approve {
            id,
            by,
            plan,
            ticket,
            comment,
        }) => commands::plan_approve(&ctx, &id, &by_or_user(by)?, plan, ticket, comment).await,
        Command::Plan(PlanCommand::Reject {
            id,
            by,
            plan,
            reason,
        }) => commands::plan_reject(&ctx, &id, &by_or_user(by)?, plan, &reason).await,
        Command::Freeze(FreezeCommand::Override { id, by, reason }) => {
            commands::freeze_override(&ctx, &id, &by_or_user(by)?, &reason).await
        }
        Command::Exception(ExceptionCommand::Grant {
            id,
            name,
            user,
            group,
            until,
            by,
            reason,
        }) => {
            let grant = exception::Grant {
                name,
                user,
                group,
                until,
            };
            exception::grant(&ctx, &id, &by_or_user(by)?, &reason, grant).await
        }
        Command::Exception(ExceptionCommand::Revoke {
            id,
            name,
            by,
            reason,
        }) => exception::revoke(&ctx, &id, &by_or_user(by)?, &reason, &name).await,
        Command::Start {
            file,
            id,
            by,
            strict,
            skip_preflight,
            reason,
            resolver,
        } => {
            let preflight = commands::StartPreflight {
                skip: reason.filter(|_| skip_preflight),
                resolver,
            };
            commands::start(&ctx, &file, id, &by_or_user(by)?, strict, preflight).await
        }
        Command::Preflight { file, resolver } => commands::preflight(&ctx, &file, resolver).await,
        Command::Run { id, once } => commands::run(&ctx, id.as_deref(), once).await,
        Command::Status { id, watch } => commands::status(&ctx, id.as_deref(), watch).await,
        Command::Serve {
            listen,
            lease,
            renew_every,
            max_rollouts,
        } => {
            let leases = commands::LeaseSettings {
                lease,
                renew_every,
                max_rollouts: usize::try_from(max_rollouts).unwrap_or(crate::runner::MAX_ROLLOUTS),
            };
            commands::serve(&ctx, listen, leases).await
        }
        Command::Token(TokenCommand::Create { name, role }) => {
            commands::token_create(&ctx, &name, &role).await
        }
        Command::Token(TokenCommand::List) => commands::token_list(&ctx).await,
        Command::Token(TokenCommand::Revoke { name }) => commands::token_revoke(&ctx, &name).await,
        Command::Approvals { id } => commands::approvals(&ctx, id.as_deref()).await,
        Command::Approve {
            id,
            yes,
            by,
            phase,
            ticket,
            comment,
            digest,
        } => {
            let by = by_or_user(by)?;
            let approval = commands::Approval {
                phase,
                ticket,
                comment,
                digest,
            };
            commands::approve(&ctx, &id, &by, approval, yes).await
        }
        Command::Reject {
            id,
            by,
            phase,
            reason,
        } => commands::reject(&ctx, &id, &by_or_user(by)?, phase, &reason).await,
        Command::Pause { id, by, reason } => {
            commands::simple(
                &ctx,
                &id,
                commands::Simple::Pause,
                &by_or_user(by)?,
                &reason,
            )
            .await
        }
        Command::Resume { id, by, reason } => {
            commands::simple(
                &ctx,
                &id,
                commands::Simple::Resume,
                &by_or_user(by)?,
                &reason,
            )
            .await
        }
        Command::Rollback { id, to, by, reason } => {
            commands::simple(
                &ctx,
                &id,
                commands::Simple::Rollback(to),
                &by_or_user(by)?,
                &reason,
            )
            .await
        }
        Command::Abort { id, by, reason } => {
            commands::simple(
                &ctx,
                &id,
                commands::Simple::Abort,
                &by_or_user(by)?,
                &reason,
            )
            .await
        }
        Command::Drift(DriftCommand::Reapply { id, by, reason }) => {
            let what = commands::Simple::Resolve(DriftResolution::Reapply);
            commands::simple(&ctx, &id, what, &by_or_user(by)?, &reason).await
        }
        Command::Drift(DriftCommand::Adopt { id, by, reason }) => {
            let what = commands::Simple::Resolve(DriftResolution::Adopt);
            commands::simple(&ctx, &id, what, &by_or_user(by)?, &reason).await
        }
        Command::History { id, verify } => commands::history(&ctx, &id, verify).await,
        Command::Demo { devices, seed } => demo::run(ctx.output, devices, seed).await,
        Command::Export { to } => recovery::export(&ctx, &to).await,
        Command::Verify { against } => recovery::verify(&ctx, &against),
        Command::RestoreTenant { from, id } => recovery::restore_tenant(&ctx, &from, &id).await,
        Command::RestoreStore { from } => recovery::restore_store(&ctx, &from),
        Command::Store(StoreCommand::Copy { from, to }) => recovery::store_copy(&from, &to),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "phasegate", &mut script);
            say_raw!("{}", String::from_utf8_lossy(&script));
            Ok(exit::OK)
        }
        Command::Emulator {
            listen,
            devices,
            seed,
            faults,
            fault_seed,
            time_scale,
            tenant,
            client_id,
            client_secret,
            client_certificates,
            federated_issuer,
            federated_subject,
            federated_issuer_key,
            token_lifetime,
            ca_rate,
            token_uses,
            scenario,
            ca_state,
            maa,
            readiness,
            apns_expiry,
            verified_domains,
            roles,
        } => {
            let credentials = emulator_credentials(
                &client_certificates,
                federated_issuer,
                federated_subject,
                federated_issuer_key,
            )?;
            if !(0.0..=1.0).contains(&faults) {
                return Err(Failure::invalid("--faults must be between 0 and 1"));
            }
            if devices == 0
                || i64::from(devices) > crate::provider::simulator::settings::MAX_DEVICES
            {
                return Err(Failure::invalid("--devices must be between 1 and 5000000"));
            }
            let settings = crate::emulator::Settings {
                devices,
                seed,
                faults,
                fault_seed: fault_seed.unwrap_or(seed),
                time_scale: time_scale.filter(|x| *x > 0.0),
                tenant_domain: tenant,
                client_id,
                client_secret,
                credentials,
                token_lifetime,
                token_uses,
                ca_requests_per_second: ca_rate,
                remediation_half_life:
                    crate::provider::simulator::settings::DEFAULT_REMEDIATION_HALF_LIFE,
            };
            let setup = crate::emulator::Setup {
                scenario: scenario.parse().map_err(|e: String| Failure::invalid(e))?,
                ca_state: ca_state
                    .map(|s| s.parse())
                    .transpose()
                    .map_err(|e: String| Failure::invalid(e))?,
                maa,
                readiness: emulator_readiness(&readiness, apns_expiry, verified_domains, roles)?,
            };
            crate::emulator::run(listen, settings, setup)
                .await
                .map_err(|e| Failure {
                    code: exit::FAILURE,
                    message: format!("emulator on {listen}: {e}"),
                })?;
            Ok(exit::OK)
        }
    }
}

/// The emulated app's certificate and federated credentials, read from their files.
fn emulator_credentials(
    certificates: &[PathBuf],
    issuer: Option<String>,
    subject: Option<String>,
    issuer_key: Option<PathBuf>,
) -> Result<crate::emulator::credentials::AppCredentials, Failure> {
    let read = |path: &PathBuf, what: &str| {
        let bytes = std::fs::read(path)
            .map_err(|e| Failure::invalid(format!("{what} {}: {e}", path.display())))?;
        jsonwebtoken::DecodingKey::from_rsa_pem(&bytes).map_err(|e| {
            Failure::invalid(format!(
                "{what} {}: not an RSA certificate or public key in PEM: {e}",
                path.display()
            ))
        })?;
        Ok::<_, Failure>(bytes)
    };
    let certificates = certificates
        .iter()
        .map(|path| read(path, "--client-certificate"))
        .collect::<Result<_, _>>()?;
    let federation = match (issuer, subject, issuer_key) {
        (Some(issuer), Some(subject), Some(key)) => {
            Some(crate::emulator::credentials::Federation {
                issuer,
                subject,
                audience: crate::emulator::credentials::FEDERATION_AUDIENCE.to_string(),
                issuer_key: read(&key, "--federated-issuer-key")?,
            })
        }
        _ => None,
    };
    Ok(crate::emulator::credentials::AppCredentials {
        certificates,
        federation,
    })
}

/// The emulator's `--readiness` and the flags that adjust it.
fn emulator_readiness(
    variant: &str,
    apns_expiry: Option<String>,
    domains: Vec<String>,
    roles: Option<String>,
) -> Result<crate::emulator::Readiness, Failure> {
    let mut checked = Vec::new();
    for domain in &domains {
        match crate::preflight::settings::domain_name(domain) {
            Some(name) => checked.push(name),
            None => {
                return Err(Failure::invalid(format!(
                    "--verified-domain `{domain}` is not a domain name"
                )));
            }
        }
    }
    Ok(crate::emulator::Readiness {
        variant: variant.parse().map_err(|e: String| Failure::invalid(e))?,
        domains: checked,
        apns: apns_expiry
            .map(|text| crate::emulator::Apns::parse(&text))
            .transpose()
            .map_err(Failure::invalid)?
            .unwrap_or_default(),
        roles: roles.map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect()
        }),
    })
}

fn default_store() -> PathBuf {
    dirs::data_dir()
        .map(|d| d.join("phasegate"))
        .unwrap_or_else(|| PathBuf::from(".phasegate"))
}

/// Who gives a command: `--by`, else the OS user when it is known. Nobody is refused: the audit
/// trail must name a person, and approvals compare names.
fn by_or_user(by: Option<String>) -> Result<String, Failure> {
    actor(by, |var| std::env::var(var).ok(), account_name)
}

/// [`by_or_user`] with the environment and the account database passed in.
fn actor(
    by: Option<String>,
    env: impl Fn(&str) -> Option<String>,
    account: impl FnOnce() -> Option<String>,
) -> Result<String, Failure> {
    let os_user = || {
        ["USER", "USERNAME", "LOGNAME"]
            .into_iter()
            .filter_map(&env)
            .chain(std::iter::once_with(account).flatten())
            .find(|name| !name.trim().is_empty())
    };
    use crate::domain::plan::approval::MAX_IDENTITY_LEN;
    match by {
        Some(name) if name.trim().is_empty() => {
            Err(Failure::invalid("--by: a person's name must not be empty"))
        }
        Some(name) if name.trim().chars().count() > MAX_IDENTITY_LEN => Err(Failure::invalid(
            format!("--by: a person's name has at most {MAX_IDENTITY_LEN} characters"),
        )),
        Some(name) => Ok(name.trim().to_string()),
        None => os_user()
            .map(|name| name.trim().to_string())
            .ok_or_else(|| {
                Failure::invalid(
                    "who is doing this? the OS user is not known: name yourself with --by",
                )
            }),
    }
}

/// The name of the account the process runs as, from the system's account database.
#[cfg(unix)]
fn account_name() -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero `passwd` is a valid value of a plain C struct; getpwuid_r fills it.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to memory that outlives the call, `buf.len()` is its size, and
    // getpwuid_r writes only there.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut entry,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() || entry.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success `pw_name` points at a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) };
    name.to_str().ok().map(str::to_string)
}

#[cfg(not(unix))]
fn account_name() -> Option<String> {
    None
}

/// A lease length or renewal interval: a humantime duration within the store's bounds.
fn lease_duration(text: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e}"))?;
    let (low, high) = crate::store::LEASE_BOUNDS;
    if d < low || d > high {
        return Err(format!(
            "`{text}` is out of range: between {} and {}",
            humantime::format_duration(low),
            humantime::format_duration(high)
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::{actor, colour_logs};

    #[test]
    fn the_os_user_is_the_default_only_when_it_is_known() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let none = || None;
        assert_eq!(actor(Some(" Bob ".into()), env(&[]), none).unwrap(), "Bob");
        assert_eq!(
            actor(None, env(&[("USER", "alice")]), none).unwrap(),
            "alice"
        );
        assert_eq!(
            actor(None, env(&[("USER", " "), ("LOGNAME", "carol")]), none).unwrap(),
            "carol"
        );
        assert_eq!(
            actor(None, env(&[]), || Some("root".into())).unwrap(),
            "root"
        );
        let unknown = actor(None, env(&[("USER", "")]), none).unwrap_err();
        assert_eq!(unknown.code, super::exit::INVALID);
        assert!(
            unknown.message.contains("the OS user is not known"),
            "{}",
            unknown.message
        );
        for empty in ["", "  "] {
            let refused = actor(Some(empty.into()), env(&[("USER", "alice")]), none).unwrap_err();
            assert_eq!(refused.code, super::exit::INVALID);
            assert!(refused.message.contains("must not be empty"));
        }
        assert!(actor(Some("x".repeat(257)), env(&[]), none).is_err());
    }
    use std::ffi::OsStr;

    /// Every command and every argument says what it is for in `--help`.
    #[test]
    fn every_command_and_argument_has_help_text() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", command.get_name());
            if command.get_about().is_none() && path.contains(' ') && path != "phasegate" {
                missing.push(format!("{path}: no about"));
            }
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}: no help"));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        let root = <super::Cli as clap::CommandFactory>::command();
        for sub in root.get_subcommands() {
            walk(sub, "phasegate", &mut missing);
        }
        for arg in root.get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" && arg.get_help().is_none() {
                missing.push(format!("phasegate {id}: no help"));
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    #[test]
    fn logs_are_coloured_only_for_a_terminal_without_no_color() {
        assert!(colour_logs(true, None));
        assert!(colour_logs(true, Some(OsStr::new(""))));
        assert!(!colour_logs(true, Some(OsStr::new("1"))));
        assert!(!colour_logs(false, None));
    }
}
