//! Fuzz target: the plan parser (`adapters::parse_plan`), which reads whatever file a person
//! points `plan check` or `start` at. Part of `cargo test`; see "Fuzzing" in docs/reliability.md.
//! The Graph client's target is `src/provider/graph/client/fuzz.rs`.
//!
//! Whatever the text, `parse_plan` returns: a `Plan` that keeps the plan's bounds (and whose
//! adapter settings read back at run time), or errors, at least one, each spanning part of the
//! text, that render with their line and column. The inputs: the files of
//! `tests/fuzz-corpus/plans/` first, then structured mutations of the example plans and the
//! fixtures (bytes changed, lines deleted, duplicated, swapped, values replaced by hostile ones,
//! hostile lines and tables inserted), then arbitrary text.
//!
//! `PHASEGATE_FUZZ_CASES=n` runs `n` cases of each generated kind.

use std::path::{Path, PathBuf};

use phasegate::adapters::{self, parse_plan};
use phasegate::domain::plan::{self, Plan, position};
use phasegate::notifier;
use phasegate::provider::{graph, simulator};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

/// Mutated plans by default.
const MUTATED_CASES: u32 = 1500;
/// Arbitrary texts by default.
const ARBITRARY_CASES: u32 = 500;

fn cases(default: u32) -> u32 {
    std::env::var("PHASEGATE_FUZZ_CASES")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(default)
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fuzz-corpus/plans.proptest-regressions",
        ))),
        max_shrink_iters: 2048,
        ..Config::default()
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// The plans mutations start from: the examples and the fixtures.
fn seeds() -> Vec<String> {
    let mut texts: Vec<String> = files("plans")
        .into_iter()
        .chain(files("tests/fixtures"))
        .map(|path| std::fs::read_to_string(path).unwrap())
        .collect();
    assert!(texts.len() >= 5, "the example plans");
    texts.sort();
    texts
}

// ---- the property ----

/// What `parse_plan` must make of any text; `Err` says what it did wrong.
fn check(text: &str) -> Result<(), String> {
    match parse_plan("fuzz.toml", text) {
        Ok(plan) => check_plan(&plan, text),
        Err(errors) => {
            if errors.diagnostics.is_empty() {
                return Err("rejected without a diagnostic".into());
            }
            if errors.source != text {
                return Err("errors carry another text".into());
            }
            let lines = text.split('\n').count();
            for d in &errors.diagnostics {
                if d.span.start > d.span.end || d.span.end > text.len() {
                    return Err(format!(
                        "span {:?} outside the text ({} bytes): {}",
                        d.span,
                        text.len(),
                        d.message
                    ));
                }
                let at = position(text, d.span.start);
                if at.line == 0 || at.line > lines || at.column == 0 {
                    return Err(format!("position {at:?} of {:?}", d.span));
                }
                if d.message.trim().is_empty() {
                    return Err(format!("an empty message at {:?}", d.span));
                }
            }
            let headlines = errors.headlines();
            let shown = errors.to_string();
            if headlines.len() != errors.diagnostics.len()
                || !headlines.iter().all(|h| shown.contains(h.as_str()))
            {
                return Err("the rendering lost a problem".into());
            }
            Ok(())
        }
    }
}

/// A plan is the proof that validation passed: its bounds hold, and its adapters read their
/// settings back as they will at run time.
fn check_plan(plan: &Plan, text: &str) -> Result<(), String> {
    let n = plan.phases.len();
    if n == 0 || n > plan::MAX_PHASES {
        return Err(format!("{n} phases"));
    }
    if plan.hash != plan::hash_source(text) {
        return Err("the hash is not the text's".into());
    }
    let within =
        |d: std::time::Duration, range: plan::DurationRange| range.min <= d && d <= range.max;
    if !within(plan.observe_every, plan::OBSERVE_EVERY_RANGE) {
        return Err(format!("observe_every {:?}", plan.observe_every));
    }
    let mut order = plan.order.clone();
    order.sort_unstable();
    if order != (0..n).collect::<Vec<_>>() {
        return Err(format!("order {:?} of {n} phases", plan.order));
    }
    let rank = |i: usize| plan.order.iter().position(|&o| o == i).unwrap();
    for (i, phase) in plan.phases.iter().enumerate() {
        let groups = phase.include.len().max(phase.exclude.len());
        let gate = &phase.gate;
        let counts = [
            gate.max_noncompliant,
            gate.max_errors,
            phase.rollback_when.noncompliant_above,
            phase.rollback_when.errors_above,
        ];
        let fine = !phase.include.is_empty()
            && groups <= plan::MAX_GROUPS
            && phase.after.iter().all(|&a| a < n && rank(a) < rank(i))
            && !plan.ancestors(i).contains(&i)
            && within(phase.min_soak, plan::MIN_SOAK_RANGE)
            && phase.grace.is_none_or(|g| within(g, plan::GRACE_RANGE))
            && within(gate.stale_after, plan::STALE_AFTER_RANGE)
            && within(gate.max_hold, plan::MAX_HOLD_RANGE)
            && i64::from(gate.approvals) <= plan::MAX_APPROVALS
            && counts
                .iter()
                .flatten()
                .all(|&c| c <= plan::MAX_COUNT as u64);
        if !fine {
            return Err(format!("phase {i} out of bounds: {phase:?}"));
        }
    }
    let _ = plan.graph();
    let provider = match plan.provider.kind.as_str() {
        "graph" => graph::settings::of(&plan.provider).map(drop),
        "simulator" => simulator::settings::of(&plan.provider).map(drop),
        other => Err(format!("provider kind `{other}` accepted")),
    };
    provider.map_err(|e| format!("the provider settings do not read back: {e}"))?;
    for channel in &plan.channels {
        notifier::of(&channel.address).map_err(|e| format!("a webhook does not read back: {e}"))?;
        let _ = adapters::redacted_channel(&channel.address);
    }
    for announcement in &plan.announcements {
        let address = &announcement.address;
        let read_back = match address.kind() {
            "email" => phasegate::announce::email::of(address).map(drop),
            "teams" => phasegate::announce::teams::of(address).map(drop),
            "slack" => phasegate::announce::slack::of(address).map(drop),
            "webhook" => notifier::of(address).map(drop),
            other => Err(format!("channel `{other}` accepted")),
        };
        read_back.map_err(|e| format!("an announcement's channel does not read back: {e}"))?;
        if !within(announcement.notice, plan::announce::NOTICE_RANGE) {
            return Err(format!("notice out of bounds: {announcement:?}"));
        }
        let _ = adapters::redacted_channel(address);
    }
    Ok(())
}

// ---- the corpus ----

#[test]
fn the_plan_corpus_parses_without_a_panic() {
    let corpus = files("tests/fuzz-corpus/plans");
    assert!(corpus.len() >= 5, "the corpus is there");
    for path in corpus
        .iter()
        .chain(&files("plans"))
        .chain(&files("tests/fixtures"))
    {
        let bytes = std::fs::read(path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        if let Err(problem) = check(&text) {
            panic!("{}: {problem}", path.display());
        }
    }
}

// ---- mutations ----

/// A TOML value (its text) chosen to break parsers and validators.
fn hostile_value() -> impl Strategy<Value = String> {
    let fixed = proptest::sample::select(
        &[
            "9223372036854775807",
            "-9223372036854775808",
            "9223372036854775808",
            "100000001",
            "-1",
            "0",
            "-0",
            "1e309",
            "-1e309",
            "1e-309",
            "inf",
            "-inf",
            "nan",
            "0.0",
            "1_000_000",
            "0x7fffffffffffffff",
            "0o777",
            "true",
            "1979-05-27T07:32:00Z",
            "1979-05-27",
            "07:32:00",
            "\"\"",
            "\" \"",
            "''",
            "\"1e309s\"",
            "\"1e309%\"",
            "\"99999999999999999999d\"",
            "\"18446744073709551615s\"",
            "\"18446744073709551616ns\"",
            "\"584942417355y\"",
            "\"-1d\"",
            "\"1M\"",
            "\"2 mo\"",
            "\"0s\"",
            "\"1ns\"",
            "\"NaN%\"",
            "\"inf%\"",
            "\"-0%\"",
            "\"100.0000000001%\"",
            "\"101%\"",
            "\"%\"",
            "\"5\"",
            "\"\\u0000\"",
            "\"\\u001b[31m\"",
            "\"\\u202e\\u2066\"",
            "\"\\r\\n\"",
            "\"é💥\"",
            "\"\u{feff}\"",
            "\"PHASEGATE_\"",
            "\"PHASEGATE_X\"",
            "\"HOME\"",
            "\"http://127.0.0.1:0\"",
            "\"http://127.0.0.1:65536/\"",
            "\"http://[::1]:8080/\"",
            "\"http://localhost./\"",
            "\"http://example.com/\"",
            "\"https://\"",
            "\"https://user:secret@example.com/hook?token=1\"",
            "\"graph\"",
            "\"simulator\"",
            "\"report\"",
            "\"enforce\"",
            "\"windows\"",
            "\"pilot\"",
            "[]",
            "[\"\"]",
            "[\"pilot\", \"pilot\"]",
            "[1, \"a\"]",
            "{}",
            "{ name = \"x\" }",
            "{ name = \"x\", platform = \"windows\" }",
            "'''multi\nline'''",
            "\"\"\"\n\"\"\"",
        ][..],
    )
    .prop_map(str::to_string);
    prop_oneof![
        8 => fixed,
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| format!("{f:?}")),
        1 => (1usize..100_000).prop_map(|n| format!("\"{}\"", "a".repeat(n))),
        1 => (0usize..300).prop_map(|n| {
            let names: Vec<String> = (0..n).map(|i| format!("\"g{i}\"")).collect();
            format!("[{}]", names.join(", "))
        }),
        1 => (1usize..3000, any::<bool>()).prop_map(|(depth, arrays)| if arrays {
            format!("{}{}", "[".repeat(depth), "]".repeat(depth))
        } else {
            format!("{}1{}", "{ a = ".repeat(depth), " }".repeat(depth))
        }),
        1 => "[ -~]{0,30}".prop_map(|s| format!("{s:?}")),
        1 => any::<String>().prop_map(|s| format!("{s:?}")),
    ]
}

/// A hostile value of the right type for its key, so that it gets past the TOML types to the
/// checks behind them.
#[derive(Clone, Debug)]
struct Typed {
    duration: String,
    percent: String,
    count: String,
    rate: String,
    list: String,
    text: String,
}

fn typed() -> impl Strategy<Value = Typed> {
    let number = proptest::sample::select(
        &[
            "0",
            "1",
            "59",
            "60",
            "3599",
            "3600",
            "31536000",
            "31536001",
            "10368000",
            "10368001",
            "604800",
            "604801",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "1.5",
            "-1",
            "",
        ][..],
    );
    let unit = proptest::sample::select(
        &[
            "s", "m", "h", "d", "w", "y", "ns", "ms", "us", "min", "days", " d", "", "M", "mo",
        ][..],
    );
    let duration = prop_oneof![
        4 => (number, unit).prop_map(|(n, u)| format!("\"{n}{u}\"")),
        1 => proptest::sample::select(
            &[
                "\"1h 30m\"",
                "\"1d 1d\"",
                "\"365d 1s\"",
                "\"120d\"",
                "\"7d 1ns\"",
                "\"1m 59s\"",
                "\"   \"",
            ][..],
        )
        .prop_map(str::to_string),
    ];
    let percent = proptest::sample::select(
        &[
            "0",
            "100",
            "100.0000001",
            "-0",
            "1e-300",
            "1e309",
            "NaN",
            "nan",
            "inf",
            "50",
            " 5 ",
            "0.5",
            "-1",
            "",
            "1_0",
            "0x10",
        ][..],
    )
    .prop_map(|x| format!("\"{x}%\""));
    let count = prop_oneof![
        proptest::sample::select(
            &[
                "0",
                "-1",
                "10",
                "11",
                "100000000",
                "100000001",
                "9223372036854775807",
                "-9223372036854775808",
                "1",
                "2",
            ][..],
        )
        .prop_map(str::to_string),
        any::<i64>().prop_map(|n| n.to_string()),
    ];
    let rate = prop_oneof![
        proptest::sample::select(
            &[
                "0.0",
                "0.001",
                "0.0009",
                "1000.0",
                "1000.0001",
                "1e309",
                "-1.0",
                "nan",
                "inf",
                "1",
                "5e-324"
            ][..],
        )
        .prop_map(str::to_string),
        any::<f64>().prop_map(|f| format!("{f:?}")),
    ];
    let name = proptest::sample::select(
        &[
            "",
            "pilot",
            "everyone",
            "enforce",
            "notify",
            "Break Glass",
            "All Users",
            "a b",
            "é",
            "\\u0000",
            "\\u202e",
            "completed",
            "failed",
            "bogus",
        ][..],
    );
    let list = prop_oneof![
        3 => vec(name, 0..5).prop_map(|names| {
            let names: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
            format!("[{}]", names.join(", "))
        }),
        1 => (99usize..103).prop_map(|n| {
            let names: Vec<String> = (0..n).map(|i| format!("\"g{i}\"")).collect();
            format!("[{}]", names.join(", "))
        }),
    ];
    let text = prop_oneof![
        proptest::sample::select(
            &[
                "\"\"",
                "\"a\"",
                "\"pilot\"",
                "\"x.y-z_1\"",
                "\"a b\"",
                "\"-\"",
                "\"PHASEGATE_GRAPH_SECRET\"",
                "\"PHASEGATE_\"",
                "\"phasegate_x\"",
                "\"http://127.0.0.1:1\"",
                "\"https://graph.microsoft.us/\"",
                "\"http://10.0.0.1/\"",
                "\"https://a:b@h/x?secret=1#f\"",
                "\"graph\"",
                "\"simulator\"",
                "\"ios\"",
                "\"macos\"",
                "\"\\u0000\"",
                "\"\\u202e\"",
                "\"é💥\"",
                "\"\\r\\n\"",
            ][..],
        )
        .prop_map(str::to_string),
        (60usize..70).prop_map(|n| format!("\"{}\"", "a".repeat(n))),
        (120usize..135).prop_map(|n| format!("\"PHASEGATE_{}\"", "A".repeat(n))),
    ];
    (duration, percent, count, rate, list, text).prop_map(
        |(duration, percent, count, rate, list, text)| Typed {
            duration,
            percent,
            count,
            rate,
            list,
            text,
        },
    )
}

impl Typed {
    fn for_key(&self, key: &str) -> &str {
        match key.trim() {
            "observe_every" | "min_soak" | "grace" | "stale_after" | "max_hold"
            | "request_timeout" => &self.duration,
            "max_noncompliant_ratio"
            | "min_reporting"
            | "max_error_ratio"
            | "noncompliant_ratio_above"
            | "blocked_ratio_above" => &self.percent,
            "max_noncompliant" | "max_errors" | "approvals" | "noncompliant_above"
            | "errors_above" | "devices" | "seed" => &self.count,
            "ca_requests_per_second" => &self.rate,
            "include" | "exclude" | "after" | "groups" | "users" | "events" => &self.list,
            _ => &self.text,
        }
    }
}

/// A line (or a few) inserted somewhere: tables again, keys again, keys nowhere expected.
fn hostile_line() -> impl Strategy<Value = String> {
    let fixed = proptest::sample::select(
        &[
            "[rollout]",
            "[policy]",
            "[provider]",
            "[[phase]]",
            "[phase.gate]",
            "[phase.rollback_when]",
            "[[webhook]]",
            "[[announcement]]",
            "channel = \"email\"",
            "channel = \"teams\"",
            "channel = \"slack\"",
            "channel = \"webhook\"",
            "channel = \"\"",
            "template = \"{plan} {nope} {\"",
            "template = \"}}{{\"",
            "subject = \"a\\nb\"",
            "on = [\"start\", \"start\", \"lunch\"]",
            "notice = \"31d\"",
            "addresses = [\"not an address\", \"\"]",
            "smtp_host = \"\"",
            "smtp_port = 0",
            "from = \"<>\"",
            "tls = \"none\"",
            "[emergency_access]",
            "[[provider]]",
            "[phase]",
            "kind = \"graph\"",
            "kind = \"simulator\"",
            "kind = \"webhook\"",
            "name = \"dup\"",
            "id = \"pilot\"",
            "mode = \"enforce\"",
            "include = [\"All Users\"]",
            "after = [\"pilot\"]",
            "after = [\"enforce\"]",
            "after = []",
            "url = \"http://127.0.0.1:9/\"",
            "events = [\"completed\", \"bogus\"]",
            "secret_env = \"PHASEGATE_HOOK\"",
            "groups = []",
            "users = [\"\"]",
            "devices = 0",
            "seed = -1",
            "tenant = \"\"",
            "graph_url = \"http://127.0.0.1:8080\"",
            "compliance = [{ name = \"x\", platform = \"windows\" }, \
             { name = \"x\", platform = \"windows\" }]",
            "compliance = []",
            "a.b.c = 1",
            "\"quoted key\" = 1",
            "'' = 1",
            "= 1",
            "x =",
            "[",
            "]]",
            "\u{0}",
            "\u{feff}[rollout]",
            "\r",
            "#\u{202e} comment",
        ][..],
    )
    .prop_map(str::to_string);
    prop_oneof![
        8 => fixed,
        2 => (key(), hostile_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => (1usize..500).prop_map(|depth| {
            let keys: Vec<String> = (0..depth).map(|i| format!("k{i}")).collect();
            format!("{} = 1", keys.join("."))
        }),
        1 => (1usize..150).prop_map(|phases| {
            (0..phases)
                .map(|i| {
                    format!("[[phase]]\nid = \"x{i}\"\nmode = \"report\"\ninclude = [\"g\"]\n")
                })
                .collect()
        }),
    ]
}

fn key() -> impl Strategy<Value = String> {
    proptest::sample::select(
        &[
            "name",
            "description",
            "observe_every",
            "separation_of_duties",
            "compliance",
            "platform",
            "conditional_access",
            "notification_template",
            "kind",
            "id",
            "mode",
            "include",
            "exclude",
            "after",
            "min_soak",
            "grace",
            "max_noncompliant",
            "max_noncompliant_ratio",
            "min_reporting",
            "stale_after",
            "max_errors",
            "max_error_ratio",
            "approvals",
            "max_hold",
            "noncompliant_ratio_above",
            "noncompliant_above",
            "errors_above",
            "blocked_ratio_above",
            "tenant",
            "client_id",
            "client_secret_env",
            "client_certificate",
            "client_certificate_password_env",
            "managed_identity",
            "identity_endpoint",
            "workload_identity",
            "federated_token_file",
            "graph_url",
            "login_url",
            "ca_requests_per_second",
            "request_timeout",
            "devices",
            "seed",
            "url",
            "secret_env",
            "events",
            "groups",
            "users",
        ][..],
    )
    .prop_map(str::to_string)
}

#[derive(Clone, Debug)]
enum Mutation {
    /// The byte at a place becomes another.
    Byte(Index, u8),
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    /// The value of a `key = value` line (any line: one without `=` gets one).
    Value(Index, String),
    /// The same, with a value of the key's type.
    TypedValue(Index, Typed),
    /// A key's line gets a value of another key's.
    SwapValues(Index, Index),
    Insert(Index, String),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, b)| Mutation::Byte(at, b)),
        2 => any::<Index>().prop_map(Mutation::DeleteLine),
        1 => any::<Index>().prop_map(Mutation::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        4 => (any::<Index>(), hostile_value()).prop_map(|(at, v)| Mutation::Value(at, v)),
        8 => (any::<Index>(), typed()).prop_map(|(at, v)| Mutation::TypedValue(at, v)),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapValues(a, b)),
        4 => (any::<Index>(), hostile_line()).prop_map(|(at, l)| Mutation::Insert(at, l)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
    ]
}

/// The lines with a value: mutations of values go there, mostly.
fn assignments(lines: &[String]) -> Vec<usize> {
    (0..lines.len())
        .filter(|&i| lines[i].contains(" = "))
        .collect()
}

fn apply(text: &str, mutation: &Mutation) -> String {
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let valued = assignments(&lines);
    let some_value = |at: &Index| {
        if valued.is_empty() {
            at.index(lines.len())
        } else {
            valued[at.index(valued.len())]
        }
    };
    match mutation {
        Mutation::Byte(at, byte) => {
            let mut bytes = text.as_bytes().to_vec();
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = *byte;
            }
            return String::from_utf8_lossy(&bytes).into_owned();
        }
        Mutation::Truncate(at) => {
            let bytes = &text.as_bytes()[..at.index(text.len() + 1)];
            return String::from_utf8_lossy(bytes).into_owned();
        }
        Mutation::DeleteLine(at) => {
            lines.remove(at.index(lines.len()));
        }
        Mutation::DuplicateLine(at) => {
            let i = at.index(lines.len());
            lines.insert(i, lines[i].clone());
        }
        Mutation::SwapLines(a, b) => {
            let (a, b) = (a.index(lines.len()), b.index(lines.len()));
            lines.swap(a, b);
        }
        Mutation::Value(at, value) => {
            let i = some_value(at);
            let key = lines[i].split(" = ").next().unwrap_or("").to_string();
            let key = if key.trim().is_empty() {
                "name".to_string()
            } else {
                key
            };
            lines[i] = format!("{key} = {value}");
        }
        Mutation::TypedValue(at, values) => {
            let i = some_value(at);
            if let Some((key, _)) = lines[i].split_once(" = ") {
                lines[i] = format!("{key} = {}", values.for_key(key));
            }
        }
        Mutation::SwapValues(a, b) => {
            let (a, b) = (some_value(a), some_value(b));
            let value = |line: &str| line.split_once(" = ").map(|(_, v)| v.to_string());
            if let (Some(va), Some(vb)) = (value(&lines[a]), value(&lines[b])) {
                let key = |line: &str| line.split(" = ").next().unwrap_or("").to_string();
                let (ka, kb) = (key(&lines[a]), key(&lines[b]));
                lines[a] = format!("{ka} = {vb}");
                lines[b] = format!("{kb} = {va}");
            }
        }
        Mutation::Insert(at, line) => {
            lines.insert(at.index(lines.len() + 1), line.clone());
        }
    }
    lines.join("\n")
}

fn mutated() -> impl Strategy<Value = String> {
    let seeds = seeds();
    (
        proptest::sample::select(seeds),
        vec(mutation(), 1..5),
        any::<bool>(),
    )
        .prop_map(|(seed, mutations, crlf)| {
            let seed = if crlf {
                seed.replace('\n', "\r\n")
            } else {
                seed
            };
            mutations.iter().fold(seed, |text, m| apply(&text, m))
        })
}

#[test]
fn mutated_plans_parse_without_a_panic() {
    let mut runner = TestRunner::new(config(cases(MUTATED_CASES)));
    runner
        .run(&mutated(), |text| {
            check(&text).map_err(|problem| TestCaseError::fail(format!("{problem}\n{text}")))
        })
        .unwrap();
}

#[test]
fn arbitrary_text_parses_without_a_panic() {
    let text = prop_oneof![
        any::<String>(),
        vec(any::<u8>(), 0..400).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        "(\\[\\[?|\\]\\]?|[a-z_]{1,10}|=|\"|'|\\{|\\}|,|\\.|[0-9]{1,5}|\n| |#|-|%)*",
    ];
    let mut runner = TestRunner::new(config(cases(ARBITRARY_CASES)));
    runner
        .run(&text, |text| {
            check(&text).map_err(|problem| TestCaseError::fail(format!("{problem}\n{text:?}")))
        })
        .unwrap();
}
