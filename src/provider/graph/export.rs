//! Observation through Intune's reports export API, Microsoft's route for large tenants:
//! `POST /deviceManagement/reports/exportJobs` for the policy's
//! `DeviceStatusByCompliacePolicyReport` (Microsoft's spelling), poll `GET
//! .../exportJobs('{id}')` until its `status` is `completed`, then download the zip of CSV its
//! `url` names ("Export Intune reports using Graph APIs",
//! learn.microsoft.com/mem/intune/fundamentals/reports-export-graph-apis; the job,
//! learn.microsoft.com/graph/api/resources/intune-reporting-devicemanagementexportjob).
//!
//! The reports and columns are those of "Intune reports and properties available using Graph
//! API" (learn.microsoft.com/intune/device-management/reports/ref-graph-available-reports):
//! `DeviceStatusByCompliacePolicyReport` lists `AadDeviceId, DeviceId, DeviceName, LastContact,
//! ManagementAgents, OS, PolicyId, PolicyStatus, UPN, UserId, UserName`, of which `DeviceId`,
//! `UserId`, `PolicyId`, `PolicyStatus` and `LastContact` are read. That page lists no filter
//! for the report; the job asks for `(PolicyId eq '<id>')` as the admin center's per-policy view
//! does, and the reader also drops any row of another policy, so an unfiltered answer counts the
//! same. Microsoft documents `PolicyStatus` but not its numbers: they are read as third-party
//! exporters read them (see `devices.rs`), and its words as well, for `ReplaceLocalizableValues`.
//!
//! That report says a device is in grace, not until when. When any device is, one more job per
//! observation asks for `DeviceCompliance` ("Device Compliance Org", every managed device)
//! with `DeviceId` and `InGracePeriodUntil`, streamed like the first; only the devices in grace
//! in a policy's report keep the date ([`join_grace_ends`]). It is the device's grace, across its
//! policies: the moment Intune marks it noncompliant. Any of
//! `DeviceManagementConfiguration.Read.All` or `DeviceManagementManagedDevices.Read.All` may read
//! a job; creating one is a POST the app's `DeviceManagementConfiguration.ReadWrite.All` covers.
//!
//! The `url` is a pre-authenticated Azure Storage blob URL on another origin: it is downloaded
//! with [`GraphClient::download`], which never attaches the bearer token, and never written to a
//! log with its signature. The zip goes to an anonymous temporary file (the zip format keeps its
//! directory at the end, so reading needs `Seek`), and its CSV is decompressed and parsed as a
//! stream, row by row, into [`Devices`]: one small record per device, never the rows themselves.
//!
//! Waiting is bounded: a poll every [`POLL_EVERY`] of tenant time (the emulator's manual clock is
//! moved instead of slept on), at most [`MAX_WAIT`] in all; a throttled poll (`429`, the export
//! API's 48 requests per app per minute) waits its `Retry-After` through the client's retry
//! policy (`retry.rs`).

use std::io::{Read, Seek};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Access, GraphClient};
use super::devices::{Devices, ReportRow, ReportStatus};
use crate::domain::time::Timestamp;
use crate::provider::ProviderError;

pub const REPORT_NAME: &str = "DeviceStatusByCompliacePolicyReport";
/// The columns read: device id, user id, the policy (to drop other policies' rows), the
/// policy's status for the device, its last contact, and its Entra device id (`AadDeviceId`,
/// read only when a phase's group has device members: device groups list their members by it).
pub const SELECT: [&str; 6] = [
    "DeviceId",
    "UserId",
    "PolicyId",
    "PolicyStatus",
    "LastContact",
    "AadDeviceId",
];
/// The report with each device's grace end, and its columns read.
pub const GRACE_REPORT: &str = "DeviceCompliance";
pub const GRACE_SELECT: [&str; 2] = ["DeviceId", "InGracePeriodUntil"];
/// `InGracePeriodUntil` at or past this (9999-01-01) is Intune's "never expires".
const NEVER: i64 = 253_370_764_800_000;
pub const POLL_EVERY: Duration = Duration::from_secs(10);
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 60);
/// The largest zip downloaded, and the most CSV text read out of it.
pub const MAX_ZIP_BYTES: u64 = 4 << 30;
pub const MAX_CSV_BYTES: u64 = 16 << 30;

/// One policy's report, through one export job: its zip, downloaded, to be read with
/// [`read_policy`].
pub async fn download_policy(
    client: &GraphClient,
    policy_id: &str,
) -> Result<std::fs::File, ProviderError> {
    let what = format!("the {REPORT_NAME} export of policy {policy_id}");
    downloaded(client, &job_request(policy_id), &what).await
}

/// Every device of one policy from its downloaded report, their Entra device ids too when
/// `with_aad` (on a blocking thread: a million rows take a while).
pub async fn read_policy(
    file: std::fs::File,
    policy_id: &str,
    with_aad: bool,
) -> Result<Devices, ProviderError> {
    let what = format!("the {REPORT_NAME} export of policy {policy_id}");
    let policy = policy_id.to_string();
    tokio::task::spawn_blocking(move || {
        read_zip(file, &policy, with_aad).map_err(std::io::Error::other)
    })
    .await
    .map_err(|e| ProviderError::transient(format!("reading the export: {e}")))?
    .map_err(|e| ProviderError::transient(format!("reading {what}: {e}")))
}

/// Dates the grace of every device in grace in `policies` from one `DeviceCompliance` export;
/// no job when no device is in grace.
pub async fn join_grace_ends(
    client: &GraphClient,
    mut policies: Vec<Devices>,
) -> Result<Vec<Devices>, ProviderError> {
    if policies.iter().all(|d| d.in_grace() == 0) {
        return Ok(policies);
    }
    let what = format!("the {GRACE_REPORT} export");
    let file = downloaded(client, &grace_request(), &what).await?;
    tokio::task::spawn_blocking(move || {
        read_grace_zip(file, |device, end| {
            for devices in policies.iter_mut() {
                devices.set_grace_end(device, end);
            }
        })
        .map(|()| policies)
        .map_err(std::io::Error::other)
    })
    .await
    .map_err(|e| ProviderError::transient(format!("reading the export: {e}")))?
    .map_err(|e| ProviderError::transient(format!("reading {what}: {e}")))
}

/// The zip of a completed job, in an anonymous temporary file rewound to its start.
async fn downloaded(
    client: &GraphClient,
    body: &Value,
    what: &str,
) -> Result<std::fs::File, ProviderError> {
    let url = completed_job(client, body, what).await?;
    let mut file = tempfile::tempfile()
        .map_err(|e| ProviderError::transient(format!("a temporary file for the export: {e}")))?;
    client.download(&url, &mut file, MAX_ZIP_BYTES).await?;
    file.rewind()
        .map_err(|e| ProviderError::transient(format!("rewinding the export: {e}")))?;
    Ok(file)
}

/// The body that asks for every device's grace end.
pub fn grace_request() -> Value {
    json!({
        "reportName": GRACE_REPORT,
        "select": GRACE_SELECT,
        "format": "csv",
        "localizationType": "localizedValuesAsAdditionalColumn",
    })
}

/// The body that asks for the policy's report.
pub fn job_request(policy_id: &str) -> Value {
    json!({
        "reportName": REPORT_NAME,
        "filter": format!("(PolicyId eq {})", crate::graph::odata_quote(policy_id)),
        "select": SELECT,
        "format": "csv",
        "localizationType": "localizedValuesAsAdditionalColumn",
    })
}

/// Creates the job and polls it until it is completed: its download URL.
async fn completed_job(
    client: &GraphClient,
    body: &Value,
    what: &str,
) -> Result<String, ProviderError> {
    let mut job = client
        .call(
            Method::POST,
            "/deviceManagement/reports/exportJobs",
            Some(body),
            &[],
            // A job only reads: asking again after a lost answer makes a second, harmless one.
            Access::Read,
        )
        .await?;
    let id = job["id"]
        .as_str()
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 256
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .ok_or_else(|| ProviderError::permanent(format!("{what}: the job has no usable id")))?
        .to_string();
    let deadline = client.now().plus(MAX_WAIT);
    let polls = MAX_WAIT.as_secs() / POLL_EVERY.as_secs() + 1;
    for _ in 0..polls {
        match job["status"].as_str().unwrap_or("unknown") {
            "completed" => {
                return job["url"].as_str().map(str::to_string).ok_or_else(|| {
                    ProviderError::transient(format!("{what}: completed without a url"))
                });
            }
            "failed" => {
                return Err(ProviderError::transient(format!("{what}: the job failed")));
            }
            _ => {}
        }
        if client.now() >= deadline {
            break;
        }
        pause(client, POLL_EVERY).await?;
        job = client
            .call(
                Method::GET,
                &format!("/deviceManagement/reports/exportJobs('{id}')"),
                None,
                &[],
                Access::Read,
            )
            .await?;
    }
    Err(ProviderError::transient(format!(
        "{what}: not completed within {}",
        crate::domain::time::format_span(MAX_WAIT)
    )))
}

/// Lets `span` of tenant time pass: the emulator's manual clock is moved, a real tenant's
/// waited for.
async fn pause(client: &GraphClient, span: Duration) -> Result<(), ProviderError> {
    if client.is_manual_clock() {
        client.advance_clock(client.now().plus(span)).await
    } else {
        let factor = client.clock_factor();
        let real = if factor > 0.0 {
            span.div_f64(factor.max(1e-3))
        } else {
            span
        };
        tokio::time::sleep(real.min(span)).await;
        Ok(())
    }
}

/// The devices of a report's zip: its CSV file read as a stream, the rows of other policies
/// than `policy_id` dropped; their Entra device ids read when `with_aad`.
pub fn read_zip<R: Read + Seek + Send>(
    zip: R,
    policy_id: &str,
    with_aad: bool,
) -> Result<Devices, String> {
    with_csv(zip, |entry| {
        // About 100 bytes a row at least: room for that many rows up front, within the bound.
        let mut devices = Devices::with_capacity((entry.size() / 100) as usize);
        inflated_beside(entry.take(MAX_CSV_BYTES), |text| {
            read_csv(text, policy_id, with_aad, |row| devices.add(row))
        })?;
        devices.finish()?;
        Ok(devices)
    })
}

/// Hands `each` the device key and grace end of every row of a `DeviceCompliance` zip that
/// dates one.
pub fn read_grace_zip<R: Read + Seek + Send>(
    zip: R,
    mut each: impl FnMut(super::devices::Key, Timestamp),
) -> Result<(), String> {
    with_csv(zip, |entry| {
        inflated_beside(entry.take(MAX_CSV_BYTES), |text| {
            read_grace_csv(text, &mut each)
        })
    })
}

/// Bytes handed from the inflating thread to the parsing one at a time, and how many such
/// chunks may wait: at most 4 × 256 KiB of text in flight, whatever the report's size.
const CHUNK: usize = 256 << 10;
const CHUNKS_IN_FLIGHT: usize = 4;

/// Runs `parse` on the text `source` gives while another thread reads (inflates) it: the
/// zip's deflate and the CSV parse each take about half a report's time, and overlap. The
/// text passes through a bounded channel of chunks, which come back to be refilled. A read
/// error reaches `parse` as one; the inflating thread stops when `parse` returns.
fn inflated_beside<S: Read + Send, T>(
    source: S,
    parse: impl FnOnce(&mut dyn Read) -> Result<T, String>,
) -> Result<T, String> {
    use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
    struct Chunks {
        full: Receiver<std::io::Result<Vec<u8>>>,
        empty: SyncSender<Vec<u8>>,
        current: Vec<u8>,
        at: usize,
    }
    impl Read for Chunks {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            while self.at == self.current.len() {
                match self.full.recv() {
                    Ok(Ok(chunk)) => {
                        let used = std::mem::replace(&mut self.current, chunk);
                        self.at = 0;
                        // The inflating thread may have stopped: then the chunk is dropped.
                        let _ = self.empty.try_send(used);
                    }
                    Ok(Err(e)) => return Err(e),
                    // The inflating thread is done: the end of the text.
                    Err(_) => return Ok(0),
                }
            }
            let n = out.len().min(self.current.len() - self.at);
            out[..n].copy_from_slice(&self.current[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }
    let (full_tx, full) = sync_channel(CHUNKS_IN_FLIGHT);
    let (empty, empty_rx) = sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT + 2);
    std::thread::scope(|scope| {
        let inflating = scope.spawn(move || {
            let mut source = source;
            loop {
                let mut chunk = empty_rx.try_recv().unwrap_or_default();
                chunk.resize(CHUNK, 0);
                let mut filled = 0;
                let read = loop {
                    match source.read(&mut chunk[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            filled += n;
                            if filled == CHUNK {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                chunk.truncate(filled);
                let last = filled < CHUNK;
                let sent = match read {
                    Ok(()) if filled == 0 => break,
                    Ok(()) => full_tx.send(Ok(chunk)),
                    Err(e) => {
                        let _ = full_tx.send(Ok(chunk));
                        let _ = full_tx.send(Err(e));
                        break;
                    }
                };
                // `parse` returned early (its receiver is gone), or the text ended.
                if sent.is_err() || last {
                    break;
                }
            }
        });
        let mut chunks = Chunks {
            full,
            empty,
            current: Vec::new(),
            at: 0,
        };
        let parsed = parse(&mut chunks);
        // Stops the inflating thread at its next chunk, if `parse` stopped first.
        drop(chunks);
        inflating
            .join()
            .map_err(|_| "the thread inflating the export failed".to_string())?;
        parsed
    })
}

fn read_grace_csv(
    text: &mut dyn Read,
    each: &mut impl FnMut(super::devices::Key, Timestamp),
) -> Result<(), String> {
    let mut reader = csv_reader(text);
    let header = reader.byte_headers().map_err(|e| e.to_string())?.clone();
    let (Some(device), Some(until)) = (
        column(&header, "DeviceId"),
        column(&header, "InGracePeriodUntil"),
    ) else {
        return Err("the report has no DeviceId or InGracePeriodUntil column".into());
    };
    let mut record = csv::ByteRecord::new();
    while reader
        .read_byte_record(&mut record)
        .map_err(|e| e.to_string())?
    {
        let text = |i| {
            record
                .get(i)
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or("")
        };
        let end = parse_contact(text(until)).filter(|t| t.as_millis() < NEVER);
        if let (Some(device), Some(end)) = (super::devices::key(text(device)), end) {
            each(device, end);
        }
    }
    Ok(())
}

/// `read` of the zip's CSV file, as a stream.
fn with_csv<R: Read + Seek + Send, T>(
    zip: R,
    read: impl FnOnce(zip::read::ZipFile<'_, R>) -> Result<T, String>,
) -> Result<T, String> {
    let mut archive = zip::ZipArchive::new(zip).map_err(|e| format!("not a zip: {e}"))?;
    let index = (0..archive.len())
        .find(|&i| {
            archive.name_for_index(i).is_some_and(|n| {
                n.ok()
                    .is_some_and(|n| n.to_ascii_lowercase().ends_with(".csv"))
            })
        })
        .ok_or("the zip holds no CSV file")?;
    read(archive.by_index(index).map_err(|e| e.to_string())?)
}

fn csv_reader<T: Read>(text: T) -> csv::Reader<T> {
    csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .buffer_capacity(1 << 16)
        .from_reader(text)
}

/// The position of the header's column `name` (any case, after a byte-order mark).
fn column(header: &csv::ByteRecord, name: &str) -> Option<usize> {
    header.iter().position(|h| {
        let h = h.strip_prefix(b"\xef\xbb\xbf").unwrap_or(h);
        h.eq_ignore_ascii_case(name.as_bytes())
    })
}

/// Hands each row of `policy_id`'s report CSV to `row`, by the columns its header names; rows
/// of another policy (a `PolicyId` column naming another) are skipped.
pub fn read_csv(
    text: impl Read,
    policy_id: &str,
    with_aad: bool,
    mut row: impl FnMut(&ReportRow) -> Result<(), String>,
) -> Result<(), String> {
    let mut reader = csv_reader(text);
    let header = reader.byte_headers().map_err(|e| e.to_string())?.clone();
    let column = |name: &str| column(&header, name);
    let (Some(device), Some(status)) = (column("DeviceId"), column("PolicyStatus")) else {
        return Err("the report has no DeviceId or PolicyStatus column".into());
    };
    let user = column("UserId");
    let policy = column("PolicyId");
    let last = column("LastContact");
    let aad = column("AadDeviceId").filter(|_| with_aad);
    let mut record = csv::ByteRecord::new();
    fn field(record: &csv::ByteRecord, i: Option<usize>) -> &str {
        i.and_then(|i| record.get(i))
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }
    while reader
        .read_byte_record(&mut record)
        .map_err(|e| e.to_string())?
    {
        if policy.is_some() && !field(&record, policy).eq_ignore_ascii_case(policy_id) {
            continue;
        }
        row(&ReportRow {
            device_id: field(&record, Some(device)),
            aad_device_id: field(&record, aad),
            user_id: field(&record, user),
            status: ReportStatus::parse(field(&record, Some(status))),
            last_contact: parse_contact(field(&record, last)),
        })?;
    }
    Ok(())
}

/// `LastContact`: ISO 8601 in UTC, with `T` or a space, with or without a zone or fraction.
pub fn parse_contact(text: &str) -> Option<Timestamp> {
    let text = text.trim();
    if text.is_empty() || text.starts_with("0001-01-01") {
        return None;
    }
    // The common form, read directly (a million rows per report); anything else, the general
    // parser.
    fast_utc(text.as_bytes())
        .or_else(|| crate::graph::parse_time(text))
        .or_else(|| {
            let iso = text.replacen(' ', "T", 1);
            let zoned = if iso.ends_with('Z') || iso.contains('+') {
                iso
            } else {
                format!("{iso}Z")
            };
            crate::graph::parse_time(&zoned)
        })
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.fraction][Z]` in UTC; `None` for any other shape or a value out of
/// range.
fn fast_utc(b: &[u8]) -> Option<Timestamp> {
    let digits = |from: usize, len: usize| -> Option<i64> {
        b.get(from..from + len)?.iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &b[19..];
    let mut millis = 0i64;
    if let Some((b'.', fraction)) = rest.split_first() {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 9 {
            return None;
        }
        for (i, c) in fraction[..n].iter().take(3).enumerate() {
            millis += i64::from(c - b'0') * [100, 10, 1][i];
        }
        rest = &fraction[n..];
    }
    if !(rest.is_empty() || rest == b"Z") {
        return None;
    }
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(Timestamp::from_millis(
        ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_read_by_their_header_with_a_bom_and_extra_columns() {
        let csv = "\u{feff}DeviceId,UserId,PolicyId,PolicyStatus,PolicyStatus_loc,LastContact\n\
                   d1,u1,p,4,Not compliant,2026-11-30 10:00:00\n\
                   d2,,P,2,Compliant,2026-11-30T10:00:00.1234567Z\n\
                   d9,u9,other,4,Not compliant,2026-11-30 10:00:00\n\
                   d3,u3,p,1,Unknown,\n";
        let mut rows = Vec::new();
        read_csv(csv.as_bytes(), "p", false, |r| {
            rows.push((
                r.device_id.to_string(),
                r.user_id.to_string(),
                r.status,
                r.last_contact.map(|t| t.as_millis()),
            ));
            Ok(())
        })
        .unwrap();
        let t = Timestamp::parse_rfc3339("2026-11-30T10:00:00Z")
            .unwrap()
            .as_millis();
        assert_eq!(
            rows,
            vec![
                (
                    "d1".into(),
                    "u1".into(),
                    ReportStatus::Noncompliant,
                    Some(t)
                ),
                (
                    "d2".into(),
                    "".into(),
                    ReportStatus::Compliant,
                    Some(t + 123)
                ),
                ("d3".into(), "u3".into(), ReportStatus::Unknown, None),
            ]
        );
        assert!(read_csv("Name\nx\n".as_bytes(), "p", false, |_| Ok(())).is_err());
        assert!(read_zip(std::io::Cursor::new(b"not a zip".to_vec()), "p", false).is_err());
    }

    #[test]
    fn last_contact_reads_as_the_general_parser_reads_it() {
        for text in [
            "2026-11-30T10:00:00Z",
            "2026-11-30T10:00:00.1234567Z",
            "2024-02-29T23:59:59.999Z",
            "1999-12-31T00:00:00Z",
            "2026-01-01T00:00:00.5Z",
            "9999-12-31T23:59:59.9999999Z",
        ] {
            assert_eq!(
                fast_utc(text.as_bytes()),
                crate::graph::parse_time(text),
                "{text}"
            );
        }
        assert_eq!(
            parse_contact("2026-11-30 10:00:00"),
            crate::graph::parse_time("2026-11-30T10:00:00Z")
        );
        assert_eq!(parse_contact("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_contact("2026-13-30T10:00:00Z"), None);
        // Other shapes are the general parser's.
        assert_eq!(fast_utc(b"2026-11-30T10:00:00+02:00"), None);
    }

    #[test]
    fn the_grace_report_dates_devices_and_never_is_no_date() {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        zip.start_file(
            "DeviceCompliance.csv",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        zip.write_all(
            b"DeviceId,InGracePeriodUntil\n\
              00000000-0000-4000-a000-000000000001,2026-12-03T10:00:00Z\n\
              00000000-0000-4000-a000-000000000002,9999-12-31T23:59:59Z\n\
              ,2026-12-03T10:00:00Z\n\
              00000000-0000-4000-a000-000000000003,\n",
        )
        .unwrap();
        let bytes = zip.finish().unwrap().into_inner();
        let mut dated = Vec::new();
        read_grace_zip(std::io::Cursor::new(bytes), |d, t| dated.push((d, t))).unwrap();
        assert_eq!(
            dated,
            vec![(
                super::super::devices::key("00000000-0000-4000-a000-000000000001").unwrap(),
                Timestamp::parse_rfc3339("2026-12-03T10:00:00Z").unwrap()
            )]
        );
        assert_eq!(grace_request()["reportName"], GRACE_REPORT);
        assert!(grace_request().get("filter").is_none());
    }

    #[test]
    fn text_inflated_beside_its_parse_arrives_whole_in_order_and_errors_reach_the_parse() {
        let text: Vec<u8> = (0..(CHUNK * 9 + 123)).map(|i| (i % 251) as u8).collect();
        let read = inflated_beside(std::io::Cursor::new(text.clone()), |r| {
            let mut all = Vec::new();
            r.read_to_end(&mut all).map_err(|e| e.to_string())?;
            Ok(all)
        })
        .unwrap();
        assert_eq!(read, text);
        // A parse that stops early leaves the inflating thread to stop too.
        let first = inflated_beside(std::io::Cursor::new(text.clone()), |r| {
            let mut byte = [0u8; 1];
            r.read_exact(&mut byte).map_err(|e| e.to_string())?;
            Ok(byte[0])
        });
        assert_eq!(first, Ok(0));
        // A source failing after some text.
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("corrupt deflate stream"));
                }
                let n = out.len().min(self.0);
                out[..n].fill(b'x');
                self.0 -= n;
                Ok(n)
            }
        }
        let failed = inflated_beside(Failing(CHUNK + 10), |r| {
            let mut all = Vec::new();
            r.read_to_end(&mut all).map_err(|e| e.to_string())?;
            Ok(all.len())
        });
        assert_eq!(failed, Err("corrupt deflate stream".to_string()));
    }

    #[test]
    fn the_job_asks_for_the_policy_by_a_quoted_id() {
        let body = job_request("o'brien");
        assert_eq!(body["filter"], "(PolicyId eq 'o''brien')");
        assert_eq!(body["reportName"], REPORT_NAME);
        assert_eq!(body["format"], "csv");
    }
}
