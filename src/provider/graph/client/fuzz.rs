//! Fuzz target: the Graph client against hostile answers. Part of `cargo test`; see "Fuzzing" in
//! docs/reliability.md.
//!
//! - `hostile_servers_get_an_answer_in_bounded_time` drives the real client (token, single calls,
//!   writes, listings through `@odata.nextLink`, `$batch` v1.0 and beta) against a loopback
//!   server that answers byte for byte what the case says: any status from 100 to 599, hostile
//!   `Retry-After`, `Date`, clock, `Content-Type`, `Content-Length` and `Location` headers,
//!   truncated or invalid JSON, wrong types, huge numbers, links that are relative, on other
//!   hosts, loops or not strings. Every call must end, Ok or Err, without a panic, well within its
//!   bound, and send nothing to another origin. The answers in `tests/fuzz-corpus/responses/`
//!   are served first.
//! - The pure targets take many more cases: `Retry-After` against the shipped policy (no
//!   operation waits longer than `longest_wait` in-line, all retries together), error bodies,
//!   the tenant's clock headers, and where a link may send the token.
//!
//! `PHASEGATE_FUZZ_CASES=n` runs `n` cases in each target.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::{
    Access, BatchRequest, GraphClient, Secret, ServerClock, approval_code_in, describe_error, short,
};
use crate::domain::time::Timestamp;
use crate::provider::graph::GraphSettings;
use crate::retry::{Backoff, Failure, parse_retry_after};
use crate::testing::{GRAPH_TRAFFIC, RawScript, bind, fuzz_cases, serve_raw};

/// Cases of the socket target by default: each is a few round trips on loopback.
const SOCKET_CASES: u32 = 64;
/// Cases of each pure target by default.
const PURE_CASES: u32 = 2000;

/// The client's policy, scaled down so that a case takes milliseconds: the same rules, the
/// same number of attempts, waits of milliseconds.
const FAST: Backoff = Backoff {
    attempts: Backoff::GRAPH.attempts,
    base: Duration::from_millis(1),
    cap: Duration::from_millis(4),
    longest_wait: Duration::from_millis(20),
};

/// How long one operation against a hostile server may take: its attempts on loopback (a
/// `$batch` of 45 makes at most 3 × 8 × 8), its in-line waits (at most `FAST.longest_wait` each),
/// on a busy machine. A hang is caught at `HANG`.
const BOUND: Duration = Duration::from_secs(10);
const HANG: Duration = Duration::from_secs(30);

const TOKEN_PATH: &str = "/tenant/oauth2/v2.0/token";

fn config(cases: u32, seeds: &'static str) -> Config {
    Config {
        cases: fuzz_cases(cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(seeds))),
        max_shrink_iters: 512,
        ..Config::default()
    }
}

// ---- what a hostile server says ----

/// Where a link may point; replaced when the answer is written.
const OWN: &str = "{own}";
const HOST: &str = "{host}";
const LOCALHOST: &str = "{localhost}";
const OTHER: &str = "{other}";

fn pick(options: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::sample::select(options).prop_map(str::to_string)
}

/// JSON number text, including what no Rust number holds.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        pick(&[
            "0",
            "-0",
            "-1",
            "1.5",
            "1e309",
            "-1e309",
            "1E400",
            "1e-400",
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775808",
            "-9223372036854775809",
            "4294967296",
            "65535",
            "65536",
            "70000",
            "200",
            "204",
            "301",
            "401",
            "403",
            "404",
            "408",
            "429",
            "500",
            "503",
            "3600",
            "0.000001",
            "123456789012345678901234567890",
        ]),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (100u32..600).prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap_or_default()),
    ]
}

/// A string as the server means it (JSON-quoted later).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        pick(&[
            "",
            " ",
            "\u{0}",
            "\u{1}\u{7f}\u{9b}",
            "line\r\nbreak",
            "\u{202e}reversed",
            "é",
            "💥",
            "ApprovalRequired",
            "x-msft-approval-code: 0123-abcd",
            "x-msft-approval-code:",
            "{\"Message\":\"Denied - Operation ID (for customer support): 1\"}",
            "{\"Message\": 42}",
            "{ not json",
            "{\"_version\": 3, \"Message\": \"\"}",
            "invalid_client",
            "AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x",
        ]),
        "[ -~]{0,40}",
        any::<String>(),
        (1usize..40_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// JSON text: any value, with hostile leaves and the keys the client looks for.
fn json() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        12 => pick(&["null", "true", "false", "0", "1", "\"\"", "\"x\"", "\"id-1\"", "[]", "{}"]),
        2 => number(),
        2 => text().prop_map(|t| quoted(&t)),
        // A lone surrogate: JSON no Rust string holds.
        1 => pick(&["\"\\ud800\"", "\"\\udfff\\ud800\"", "\"\\u0000\""]),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(|items| format!("[{}]", items.join(","))),
            vec((key(), inner), 0..6).prop_map(|members| {
                let members: Vec<String> = members
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", quoted(k)))
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

/// JSON text of the shapes a server means, with a hostile part now and then.
fn mild_json() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        pick(&[
            "null",
            "true",
            "false",
            "\"\"",
            "\"x\"",
            "\"id-1\"",
            "\"Pilot IT\""
        ]),
        any::<i32>().prop_map(|n| n.to_string()),
        "[a-zA-Z0-9 ]{0,12}".prop_map(|t| quoted(&t)),
    ];
    let tree = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|items| format!("[{}]", items.join(","))),
            vec((key(), inner), 0..4).prop_map(|members| {
                let members: Vec<String> = members
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", quoted(k)))
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    });
    prop_oneof![6 => tree, 1 => json()]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => pick(&[
            "value",
            "@odata.nextLink",
            "error",
            "code",
            "message",
            "error_description",
            "access_token",
            "expires_in",
            "responses",
            "id",
            "status",
            "headers",
            "Retry-After",
            "body",
            "Message",
        ]),
        1 => "[a-zA-Z@.]{0,12}",
    ]
}

/// A `@odata.nextLink` (or a `Location`): links on the Graph host and everywhere else.
fn link() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => pick(&[
            "{own}/v1.0/list",
            "{own}/v1.0/list?p=1",
            "{own}/v1.0/list?p=2",
            "{own}/v1.0/list?p=3",
            "{own}/v1.0/list?p=4",
            "{own}/beta/list?p=1",
        ]),
        3 => pick(&[
            "{own}/v1.0/list",
            "{own}/v1.0/list?p=1",
            "{own}/v1.0/list?p=2",
            "{own}/v1.0/list?p=3",
            "{own}/v1.0/list#p=1",
            "{own}/beta/list",
            "{own}/v1.0/identity/conditionalAccess/policies",
            "{own}/v1.0/list?p=%zz\u{0}",
            "{own}:99999/v1.0/list",
            "{own}@evil.example/v1.0/list",
            "{localhost}/v1.0/list",
            "{other}/v1.0/list",
            "https://{host}/v1.0/list",
            "ftp://{host}/v1.0/list",
            "//{host}/v1.0/list",
            "/v1.0/list?p=2",
            "/beta/list",
            "list?p=2",
            "?p=2",
            "",
            "javascript:alert(1)",
            "http://[::1",
            "http://",
            "{own}/v1.0/\u{202e}list",
        ]),
        1 => "[ -~]{0,60}",
        1 => (1usize..20_000).prop_map(|n| format!("{OWN}/v1.0/list?p={}", "9".repeat(n))),
    ]
}

/// JSON text of a link: mostly a string, sometimes not one.
fn link_json() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => link().prop_map(|l| quoted(&l)),
        1 => json(),
    ]
}

/// A header value, as the client reads `Retry-After`, `Date` and the emulator's clock.
fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        pick(&[
            "1e20",
            "-1",
            "-0",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "0",
            "0.001",
            "0.019",
            "0.02",
            "0.021",
            "1",
            "120",
            "121",
            "18446744073709551616",
            "1e-300",
            " 0.002 ",
            "0x10",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Thu, 01 Jan 1970 00:00:00 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Mon, 32 Foo 99999 99:99:99 GMT",
            "manual",
            "scaled; factor=NaN",
            "scaled; factor=-1",
            "scaled; factor=1e308",
            "scaled; factor=1e300",
            "scaled; factor=inf",
            "scaled; factor=0",
            "scaled; factor=2",
            "scaled; factor=",
            "factor=factor=3",
            "9999-12-31T23:59:59.999999999Z",
            "0001-01-01T00:00:00Z",
            "2026-01-08T08:35:03.7944197Z",
            "+275760-09-13T00:00:00Z",
            "1970-01-01T00:00:00Z",
            "application/json",
            "application/json; charset=utf-16",
            "text/html; charset=\u{0}",
            "gzip",
            "chunked",
            "",
            "é",
            "\u{1}",
            "0123-abcd",
        ]),
        "[ -~]{0,40}",
        link(),
    ]
}

fn header() -> impl Strategy<Value = (String, String)> {
    let name = prop_oneof![
        6 => pick(&[
            "Retry-After",
            "retry-after",
            "Content-Type",
            "Date",
            "X-Phasegate-Emulator-Now",
            "X-Phasegate-Emulator-Clock",
            "x-msft-approval-code",
            "Location",
            "Content-Encoding",
        ]),
        1 => "[A-Za-z-]{1,20}",
    ];
    (name, header_value())
}

/// What a request is answered with: its kind decides the body a server would send.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Token,
    Read,
    Batch,
}

fn page() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            3 => vec(mild_json(), 0..5).prop_map(|v| format!("[{}]", v.join(","))),
            1 => json(),
        ],
        proptest::option::weighted(0.7, link_json()),
    )
        .prop_map(|(items, next)| match next {
            Some(next) => format!("{{\"value\":{items},\"@odata.nextLink\":{next}}}"),
            None => format!("{{\"value\":{items}}}"),
        })
}

fn error_body() -> impl Strategy<Value = String> {
    let graph = (
        prop_oneof![text().prop_map(|t| quoted(&t)), json()],
        prop_oneof![text().prop_map(|t| quoted(&t)), json()],
    )
        .prop_map(|(code, message)| {
            format!("{{\"error\":{{\"code\":{code},\"message\":{message}}}}}")
        });
    let oauth = (text(), json()).prop_map(|(error, description)| {
        format!(
            "{{\"error\":{},\"error_description\":{description}}}",
            quoted(&error)
        )
    });
    prop_oneof![2 => graph, 1 => oauth]
}

fn token_body() -> impl Strategy<Value = String> {
    (
        prop_oneof![3 => Just("\"t\"".to_string()), 1 => json()],
        prop_oneof![number(), json()],
    )
        .prop_map(|(token, expires)| {
            format!("{{\"access_token\":{token},\"expires_in\":{expires}}}")
        })
}

fn batch_body() -> impl Strategy<Value = String> {
    let item = (
        prop_oneof![4 => (0u32..6).prop_map(|i| quoted(&i.to_string())), 1 => json()],
        prop_oneof![
            6 => pick(&["200", "200", "200", "429", "503", "404", "403"]),
            2 => number(),
            1 => json(),
        ],
        prop_oneof![
            header_value().prop_map(|v| format!("{{\"Retry-After\":{}}}", quoted(&v))),
            json(),
        ],
        prop_oneof![page(), error_body(), mild_json()],
    )
        .prop_map(|(id, status, headers, body)| {
            format!("{{\"id\":{id},\"status\":{status},\"headers\":{headers},\"body\":{body}}}")
        });
    prop_oneof![
        4 => vec(item, 0..8).prop_map(|items| format!("{{\"responses\":[{}]}}", items.join(","))),
        1 => json().prop_map(|r| format!("{{\"responses\":{r}}}")),
    ]
}

/// Any body: one of another kind's, nesting deeper than a parser goes, anything at all.
fn any_body() -> impl Strategy<Value = String> {
    let deep = (0usize..4000, any::<bool>()).prop_map(|(depth, closed)| {
        let close = if closed {
            "]".repeat(depth)
        } else {
            String::new()
        };
        format!("{}{close}", "[".repeat(depth))
    });
    prop_oneof![
        2 => page(),
        2 => error_body(),
        1 => token_body(),
        2 => batch_body(),
        1 => deep,
        1 => json(),
        1 => any::<String>(),
        1 => Just(String::new()),
    ]
}

/// A body for a request of `kind`: mostly the shape it expects.
fn body(kind: Kind) -> BoxedStrategy<String> {
    match kind {
        Kind::Token => prop_oneof![3 => token_body(), 1 => any_body()].boxed(),
        Kind::Read => prop_oneof![3 => page(), 1 => error_body(), 1 => any_body()].boxed(),
        Kind::Batch => prop_oneof![3 => batch_body(), 1 => error_body(), 1 => any_body()].boxed(),
    }
}

/// How the body's length is told.
#[derive(Clone, Debug)]
enum Length {
    Exact,
    /// None at all: the body ends when the connection does.
    Absent,
    /// Any `Content-Length`, shorter or longer than the body, or not a number.
    Declared(String),
    /// Two that disagree.
    Twice,
    Chunked,
    /// `Transfer-Encoding: chunked` over a body that is not.
    FalselyChunked,
}

#[derive(Clone, Debug)]
struct Reply {
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    length: Length,
}

/// One answer: a reply, or the connection closed without one.
#[derive(Clone, Debug)]
enum Answer {
    Reply(Reply),
    Drop,
}

fn status_line() -> impl Strategy<Value = String> {
    let status = prop_oneof![
        5 => Just(200u16),
        3 => 100u16..600,
        2 => proptest::sample::select(&[201u16, 204, 307, 401, 403, 404, 408, 429, 500, 503][..]),
    ];
    prop_oneof![
        20 => status.prop_map(|s| format!("HTTP/1.1 {s} Fuzzed")),
        1 => pick(&[
            "HTTP/1.1 abc Fuzzed",
            "HTTP/1.1 999 Fuzzed",
            "HTTP/2 200",
            "",
            "HTTP/1.1 200",
        ]),
    ]
}

/// A body, then damaged or not: truncated, a byte changed, garbage appended.
fn damaged_body(kind: Kind) -> impl Strategy<Value = Vec<u8>> {
    (
        body(kind),
        0u8..15,
        any::<prop::sample::Index>(),
        any::<u8>(),
    )
        .prop_map(|(body, damage, at, byte)| {
            let mut bytes = body.into_bytes();
            let at = at.index(bytes.len() + 1);
            match damage {
                0 => bytes.truncate(at),
                1 if !bytes.is_empty() => {
                    let at = at.min(bytes.len() - 1);
                    bytes[at] = byte;
                }
                2 => bytes.splice(at..at, [0xff, 0xfe, byte]).for_each(drop),
                _ => {}
            }
            bytes
        })
}

fn length() -> impl Strategy<Value = Length> {
    prop_oneof![
        12 => Just(Length::Exact),
        1 => Just(Length::Absent),
        2 => prop_oneof![
            (0usize..100_000).prop_map(|n| n.to_string()),
            pick(&["-1", "abc", "99999999999999999999", "0x10", ""]),
        ]
        .prop_map(Length::Declared),
        1 => Just(Length::Twice),
        1 => Just(Length::Chunked),
        1 => Just(Length::FalselyChunked),
    ]
}

fn answer(kind: Kind) -> impl Strategy<Value = Answer> {
    let reply = (
        status_line(),
        vec(header(), 0..4),
        damaged_body(kind),
        length(),
    )
        .prop_map(|(status_line, headers, body, length)| {
            Answer::Reply(Reply {
                status_line,
                headers,
                body,
                length,
            })
        });
    prop_oneof![12 => reply, 1 => Just(Answer::Drop)]
}

/// The addresses the placeholders stand for.
struct Places {
    own: String,
    other: String,
}

impl Places {
    /// `text` with the placeholders filled in, every other byte (UTF-8 or not) as it was.
    fn fill(&self, text: &[u8]) -> Vec<u8> {
        let host = self.own.trim_start_matches("http://");
        let port = host.rsplit(':').next().unwrap_or("");
        let places = [
            (OWN, self.own.clone()),
            (HOST, host.to_string()),
            (LOCALHOST, format!("http://localhost:{port}")),
            (OTHER, self.other.clone()),
        ];
        let mut filled = Vec::with_capacity(text.len());
        let mut rest = text;
        'bytes: while let Some(&byte) = rest.first() {
            for (place, address) in &places {
                if let Some(after) = rest.strip_prefix(place.as_bytes()) {
                    filled.extend_from_slice(address.as_bytes());
                    rest = after;
                    continue 'bytes;
                }
            }
            filled.push(byte);
            rest = &rest[1..];
        }
        filled
    }
}

impl Answer {
    fn bytes(&self, places: &Places) -> Option<Vec<u8>> {
        let Answer::Reply(reply) = self else {
            return None;
        };
        let body = places.fill(&reply.body);
        let mut head = format!("{}\r\nConnection: close\r\n", reply.status_line);
        for (name, value) in &reply.headers {
            let value = String::from_utf8_lossy(&places.fill(value.as_bytes())).into_owned();
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let mut payload = body.clone();
        match &reply.length {
            Length::Exact => head.push_str(&format!("Content-Length: {}\r\n", body.len())),
            Length::Absent => {}
            Length::Declared(n) => head.push_str(&format!("Content-Length: {n}\r\n")),
            Length::Twice => head.push_str(&format!(
                "Content-Length: {}\r\nContent-Length: {}\r\n",
                body.len(),
                body.len() + 1
            )),
            Length::Chunked => {
                head.push_str("Transfer-Encoding: chunked\r\n");
                payload = Vec::new();
                for chunk in body.chunks(7) {
                    payload.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    payload.extend_from_slice(chunk);
                    payload.extend_from_slice(b"\r\n");
                }
                payload.extend_from_slice(b"0\r\n\r\n");
            }
            Length::FalselyChunked => head.push_str("Transfer-Encoding: chunked\r\n"),
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&payload);
        Some(bytes)
    }
}

/// What one case asks of the client.
#[derive(Clone, Debug)]
enum Op {
    Get(&'static str),
    Write,
    List(&'static str),
    /// A listing of at most this many pages.
    ListBounded(usize),
    Batch {
        requests: usize,
        beta: bool,
    },
    SignIn,
}

fn op() -> impl Strategy<Value = Op> {
    let path =
        proptest::sample::select(&["/list", "/list?p=1", "/beta/list", "/deviceManagement/x"][..]);
    prop_oneof![
        3 => path.clone().prop_map(Op::Get),
        1 => Just(Op::Write),
        3 => path.prop_map(Op::List),
        1 => (1usize..6).prop_map(Op::ListBounded),
        3 => (prop_oneof![3 => 0usize..6, 1 => 0usize..45], any::<bool>())
            .prop_map(|(requests, beta)| Op::Batch { requests, beta }),
        1 => Just(Op::SignIn),
    ]
}

#[derive(Clone, Debug)]
struct Case {
    /// Answers to the token endpoint, in order; a valid token after them.
    token: Vec<Answer>,
    /// Answers to `$batch` requests, in order; `batch_rest` after them.
    batches: Vec<Answer>,
    batch_rest: Answer,
    /// Answers to every other request, in order; `rest` after them.
    reads: Vec<Answer>,
    rest: Answer,
    ops: Vec<Op>,
}

fn case() -> impl Strategy<Value = Case> {
    let token = prop_oneof![2 => Just(Vec::new()), 1 => vec(answer(Kind::Token), 1..3)];
    (
        token,
        (vec(answer(Kind::Batch), 0..6), answer(Kind::Batch)),
        vec(answer(Kind::Read), 1..8),
        answer(Kind::Read),
        vec(op(), 1..4),
    )
        .prop_map(|(token, (batches, batch_rest), reads, rest, ops)| Case {
            token,
            batches,
            batch_rest,
            reads,
            rest,
            ops,
        })
}

fn settings(url: &str) -> GraphSettings {
    GraphSettings {
        tenant: "tenant".into(),
        client_id: "client".into(),
        credential: crate::provider::graph::settings::CredentialSettings::ClientSecret {
            env: "UNUSED".into(),
        },
        graph_url: url.into(),
        login_url: url.into(),
        // Conditional Access pacing stays on, at a rate that costs a millisecond.
        ca_requests_per_second: 1000.0,
        request_timeout: Duration::from_secs(2),
        observe_through: Default::default(),
    }
}

fn client(url: &str) -> GraphClient {
    let mut client = GraphClient::new(settings(url), Secret::new("s".into())).unwrap();
    client.retry = FAST;
    client
}

/// A `Reply` from a file: the raw HTTP answer (`\n` line ends become `\r\n` in the head).
fn reply_from_file(text: &str) -> Answer {
    let (head, body) = text.split_once("\n\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    let mut length = Length::Exact;
    for line in lines {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.trim().to_string();
        if name.eq_ignore_ascii_case("content-length") {
            length = Length::Declared(value);
        } else {
            headers.push((name.to_string(), value));
        }
    }
    Answer::Reply(Reply {
        status_line,
        headers,
        body: body.trim_end_matches('\n').as_bytes().to_vec(),
        length,
    })
}

/// The corpus: every answer in `tests/fuzz-corpus/responses/`, served to every operation, as
/// the token endpoint's answer and as every other.
fn corpus() -> Vec<(String, Answer)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz-corpus/responses");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("the response corpus")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "http"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, reply_from_file(&text))
        })
        .collect()
}

/// Runs one case against a fresh server; `Err` says what went wrong.
async fn run(case: &Case) -> Result<(), String> {
    let (listener, own) = bind().await;
    // Another host: nothing the client holds may reach it.
    let (elsewhere, other) = bind().await;
    let other_connections = serve_raw(elsewhere, Arc::new(|_: &str, _: &str, _| None));
    let places = Arc::new(Places {
        own: own.clone(),
        other,
    });
    let token_seen = Arc::new(AtomicUsize::new(0));
    let batches_seen = Arc::new(AtomicUsize::new(0));
    let reads_seen = Arc::new(AtomicUsize::new(0));
    let script: Arc<RawScript> = {
        let case = case.clone();
        let places = places.clone();
        Arc::new(move |method: &str, path: &str, _| {
            if method == "POST" && path == TOKEN_PATH {
                let n = token_seen.fetch_add(1, Ordering::SeqCst);
                return match case.token.get(n) {
                    Some(answer) => answer.bytes(&places),
                    None => {
                        let token = r#"{"access_token":"t","expires_in":3600}"#;
                        let length = token.len();
                        let head = "HTTP/1.1 200 OK\r\nConnection: close\r\n";
                        Some(format!("{head}Content-Length: {length}\r\n\r\n{token}").into_bytes())
                    }
                };
            }
            if path.ends_with("/$batch") {
                let n = batches_seen.fetch_add(1, Ordering::SeqCst);
                return case
                    .batches
                    .get(n)
                    .unwrap_or(&case.batch_rest)
                    .bytes(&places);
            }
            let n = reads_seen.fetch_add(1, Ordering::SeqCst);
            case.reads.get(n).unwrap_or(&case.rest).bytes(&places)
        })
    };
    serve_raw(listener, script);
    let client = client(&own);
    for op in &case.ops {
        let started = Instant::now();
        let done = tokio::time::timeout(HANG, perform(&client, op)).await;
        let took = started.elapsed();
        match done {
            Err(_) => return Err(format!("{op:?} still running after {HANG:?}")),
            Ok(Err(problem)) => return Err(format!("{op:?}: {problem}")),
            Ok(Ok(())) if took > BOUND => return Err(format!("{op:?} took {took:?}")),
            Ok(Ok(())) => {}
        }
    }
    let leaked = other_connections.load(Ordering::SeqCst);
    if leaked > 0 {
        return Err(format!("{leaked} connections to another host"));
    }
    Ok(())
}

/// One operation: whatever it returns is fine, as long as it is consistent.
async fn perform(client: &GraphClient, op: &Op) -> Result<(), String> {
    match op {
        Op::Get(path) => {
            let _ = client
                .call(Method::GET, path, None, &[], Access::Read)
                .await;
        }
        Op::Write => {
            let body = serde_json::json!({"displayName": "x"});
            let _ = client
                .call(Method::PATCH, "/x", Some(&body), &[], Access::Write)
                .await;
        }
        Op::List(path) => {
            let mut pages = 0;
            let _ = client.for_each_page(path, &[], |_| pages += 1).await;
        }
        Op::ListBounded(bound) => {
            let mut pages = 0;
            let _ = client
                .for_each_page_bounded("/list", &[], *bound, |_| pages += 1)
                .await;
            if pages > *bound {
                return Err(format!("{pages} pages handed over"));
            }
        }
        Op::Batch { requests, beta } => {
            let requests: Vec<BatchRequest> = (0..*requests)
                .map(|i| BatchRequest {
                    id: i.to_string(),
                    url: format!("/item/{i}"),
                    headers: Vec::new(),
                })
                .collect();
            let answered = if *beta {
                client.batch_get_beta(&requests).await
            } else {
                client.batch_get(&requests).await
            };
            if let Ok(answers) = answered
                && answers.len() != requests.len()
            {
                return Err(format!(
                    "{} answers to {} requests",
                    answers.len(),
                    requests.len()
                ));
            }
        }
        Op::SignIn => {
            let _ = client.sign_in().await;
        }
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn hostile_servers_get_an_answer_in_bounded_time() {
    // These requests count in the process-wide metrics.
    let _serial = GRAPH_TRAFFIC.blocking_lock();
    let every_op = [
        Op::Get("/list"),
        Op::Write,
        Op::List("/list"),
        Op::Batch {
            requests: 3,
            beta: false,
        },
        Op::SignIn,
    ];
    let empty_page = reply_from_file("HTTP/1.1 200 OK\n\n{\"value\":[]}");
    for (name, answer) in corpus() {
        for as_token in [false, true] {
            // The answer to every request, or to the first sign-in only.
            let case = if as_token {
                Case {
                    token: vec![answer.clone()],
                    batches: Vec::new(),
                    batch_rest: empty_page.clone(),
                    reads: Vec::new(),
                    rest: empty_page.clone(),
                    ops: every_op.to_vec(),
                }
            } else {
                Case {
                    token: Vec::new(),
                    batches: Vec::new(),
                    batch_rest: answer.clone(),
                    reads: Vec::new(),
                    rest: answer.clone(),
                    ops: every_op.to_vec(),
                }
            };
            if let Err(problem) = runtime().block_on(run(&case)) {
                panic!("corpus {name} (token endpoint: {as_token}): {problem}");
            }
        }
    }
    let mut runner = TestRunner::new(config(
        SOCKET_CASES,
        "tests/fuzz-corpus/responses.proptest-regressions",
    ));
    runner
        .run(&case(), |case| {
            runtime().block_on(run(&case)).map_err(TestCaseError::fail)
        })
        .unwrap();
}

// ---- the pure parts, with many more cases ----

/// What a server answers one attempt with, as the retry policy sees it.
fn failure() -> impl Strategy<Value = Failure> {
    proptest::sample::select(
        &[
            Failure::Refused,
            Failure::Transport,
            Failure::Throttled,
            Failure::Unavailable,
        ][..],
    )
}

#[test]
fn no_retry_after_keeps_an_operation_waiting_longer_than_the_policy_allows() {
    let mut runner = TestRunner::new(config(
        PURE_CASES,
        "tests/fuzz-corpus/retry.proptest-regressions",
    ));
    let answers = vec(
        (
            failure(),
            proptest::option::of(header_value()),
            any::<u64>(),
        ),
        1..20,
    );
    runner
        .run(&answers, |answers| {
            let now = SystemTime::now();
            for policy in [Backoff::GRAPH, Backoff::WEBHOOK] {
                let mut patience = policy.patience();
                let mut waited = Duration::ZERO;
                let mut failed = 0;
                for (failure, header, seed) in &answers {
                    let asked = header.as_deref().and_then(|v| parse_retry_after(v, now));
                    failed += 1;
                    let Some(wait) = policy
                        .wait(failed, *failure, asked, *seed)
                        .filter(|&wait| patience.spend(wait))
                    else {
                        break;
                    };
                    prop_assert!(wait <= policy.longest_wait, "{wait:?}");
                    if let Some(asked) = asked {
                        prop_assert_eq!(wait, asked, "Retry-After is honoured exactly");
                    }
                    waited += wait;
                }
                prop_assert!(
                    waited <= policy.longest_wait,
                    "{policy:?} waited {waited:?}"
                );
                prop_assert!(failed <= policy.attempts);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn error_bodies_become_a_line_without_a_panic() {
    let mut runner = TestRunner::new(config(
        PURE_CASES,
        "tests/fuzz-corpus/bodies.proptest-regressions",
    ));
    let bodies = prop_oneof![
        damaged_body(Kind::Read),
        damaged_body(Kind::Batch),
        damaged_body(Kind::Token),
    ];
    runner
        .run(&bodies, |body| {
            let body = String::from_utf8_lossy(&body);
            let line = describe_error(&body);
            if serde_json::from_str::<serde_json::Value>(&body).is_err() {
                prop_assert!(line.chars().count() <= 300, "{line}");
            }
            if let Some(code) = approval_code_in(&body) {
                prop_assert!(!code.is_empty());
                prop_assert!(code.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
            }
            Ok(())
        })
        .unwrap();
}

/// The headers the tenant's clock is read from, mostly well-formed, with hostile values.
fn clock_header() -> impl Strategy<Value = (&'static str, String)> {
    let date = prop_oneof![
        any::<u64>().prop_map(|secs| {
            // Up to 9999-12-31, the last instant an HTTP date can name.
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs % 253_402_300_800);
            httpdate::fmt_http_date(at)
        }),
        header_value(),
    ];
    let now = prop_oneof![
        any::<i64>().prop_map(|ms| crate::graph::format_time(Timestamp::from_millis(ms))),
        header_value(),
    ];
    let clock = prop_oneof![
        number().prop_map(|factor| format!("scaled; factor={factor}")),
        pick(&[
            "manual",
            "scaled",
            "scaled; factor=NaN",
            "scaled; factor=-inf"
        ]),
        header_value(),
    ];
    prop_oneof![
        date.prop_map(|v| ("date", v)),
        now.prop_map(|v| ("x-phasegate-emulator-now", v)),
        clock.prop_map(|v| ("x-phasegate-emulator-clock", v)),
    ]
}

#[test]
fn the_tenants_clock_survives_any_header() {
    let client = client("http://127.0.0.1:9");
    let mut runner = TestRunner::new(config(
        PURE_CASES,
        "tests/fuzz-corpus/clock.proptest-regressions",
    ));
    let headers = vec(clock_header(), 0..4);
    runner
        .run(&headers, |headers| {
            // A fresh clock (and one a failed case left poisoned, so that shrinking works).
            client.clock.clear_poison();
            *client.clock.lock().unwrap() = ServerClock {
                anchor: None,
                manual: false,
                factor: 1.0,
                floor: Timestamp::from_millis(0),
            };
            let mut map = HeaderMap::new();
            for (name, value) in &headers {
                if let Ok(value) = HeaderValue::from_str(value) {
                    map.append(HeaderName::from_static(name), value);
                }
            }
            let before = client.now();
            client.observe_clock(&map);
            let after = client.now();
            prop_assert!(after >= before, "the tenant's clock went back");
            prop_assert!(client.clock_factor().is_finite() && client.clock_factor() >= 0.0);
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_link_sends_the_token_to_the_graph_origin_or_nowhere() {
    let own = "http://127.0.0.1:9";
    let client = client(own);
    let places = Places {
        own: own.to_string(),
        other: "http://127.0.0.1:10".to_string(),
    };
    let mut runner = TestRunner::new(config(
        PURE_CASES,
        "tests/fuzz-corpus/links.proptest-regressions",
    ));
    runner
        .run(&link(), |link| {
            let link = String::from_utf8_lossy(&places.fill(link.as_bytes())).into_owned();
            let _ = short(&link);
            let _ = super::redirect_note(307, Some(&link));
            if let Ok(target) = client.target(&link) {
                prop_assert_eq!(target.0.origin(), client.graph.origin(), "{}", link);
            }
            Ok(())
        })
        .unwrap();
}
