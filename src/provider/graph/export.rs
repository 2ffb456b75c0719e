//! Observation through Intune's reports export API, Microsoft's route for large tenants:
//! `POST /deviceManagement/reports/exportJobs` for the policy's
//! `DeviceStatusByCompliacePolicyReport` (Microsoft's spelling), poll `GET
//! .../exportJobs('{id}')` until its `status` is `completed`, then download the zip of CSV its
//! `url` names ("Export Intune reports using Graph APIs",
//! learn.microsoft.com/mem/intune/fundamentals/reports-export-graph-apis; the report and its
//! filter by `PolicyId` in "Intune reports and properties available using Graph API",
//! learn.microsoft.com/intune/device-management/reports/ref-graph-available-reports; the job,
//! learn.microsoft.com/graph/api/resources/intune-reporting-devicemanagementexportjob). Any of
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
/// The columns read: device id, user id, the policy's status for the device, its last contact.
pub const SELECT: [&str; 4] = ["DeviceId", "UserId", "PolicyStatus", "LastContact"];
pub const POLL_EVERY: Duration = Duration::from_secs(10);
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 60);
/// The largest zip downloaded, and the most CSV text read out of it.
pub const MAX_ZIP_BYTES: u64 = 4 << 30;
pub const MAX_CSV_BYTES: u64 = 16 << 30;

/// Every device of one policy, through one export job.
pub async fn observe_policy(
    client: &GraphClient,
    policy_id: &str,
) -> Result<Devices, ProviderError> {
    let url = completed_job(client, policy_id).await?;
    let mut file = tempfile::tempfile()
        .map_err(|e| ProviderError::transient(format!("a temporary file for the export: {e}")))?;
    client.download(&url, &mut file, MAX_ZIP_BYTES).await?;
    tokio::task::spawn_blocking(move || {
        file.rewind()?;
        read_zip(file).map_err(std::io::Error::other)
    })
    .await
    .map_err(|e| ProviderError::transient(format!("reading the export: {e}")))?
    .map_err(|e| ProviderError::transient(format!("reading the {REPORT_NAME} export: {e}")))
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
async fn completed_job(client: &GraphClient, policy_id: &str) -> Result<String, ProviderError> {
    let what = format!("the {REPORT_NAME} export of policy {policy_id}");
    let mut job = client
        .call(
            Method::POST,
            "/deviceManagement/reports/exportJobs",
            Some(&job_request(policy_id)),
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

/// The devices of a report's zip: its CSV file read as a stream.
pub fn read_zip<R: Read + Seek>(zip: R) -> Result<Devices, String> {
    let mut archive = zip::ZipArchive::new(zip).map_err(|e| format!("not a zip: {e}"))?;
    let index = (0..archive.len())
        .find(|&i| {
            archive.name_for_index(i).is_some_and(|n| {
                n.ok()
                    .is_some_and(|n| n.to_ascii_lowercase().ends_with(".csv"))
            })
        })
        .ok_or("the zip holds no CSV file")?;
    let entry = archive.by_index(index).map_err(|e| e.to_string())?;
    // About 60 bytes a row at least: room for that many devices up front, within the bound.
    let mut devices = Devices::with_capacity((entry.size() / 60) as usize);
    read_csv(entry.take(MAX_CSV_BYTES), |row| devices.add(row))?;
    Ok(devices)
}

/// Hands each row of the report's CSV to `row`, by the columns its header names.
pub fn read_csv(
    text: impl Read,
    mut row: impl FnMut(&ReportRow) -> Result<(), String>,
) -> Result<(), String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .buffer_capacity(1 << 16)
        .from_reader(text);
    let header = reader.byte_headers().map_err(|e| e.to_string())?.clone();
    let column = |name: &str| {
        header.iter().position(|h| {
            let h = h.strip_prefix(b"\xef\xbb\xbf").unwrap_or(h);
            h.eq_ignore_ascii_case(name.as_bytes())
        })
    };
    let (Some(device), Some(status)) = (column("DeviceId"), column("PolicyStatus")) else {
        return Err("the report has no DeviceId or PolicyStatus column".into());
    };
    let user = column("UserId");
    let last = column("LastContact");
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
        row(&ReportRow {
            device_id: field(&record, Some(device)),
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
        let csv = "\u{feff}DeviceId,UserId,PolicyStatus,PolicyStatus_loc,LastContact\n\
                   d1,u1,4,Not compliant,2026-11-30 10:00:00\n\
                   d2,,2,Compliant,2026-11-30T10:00:00.1234567Z\n\
                   d3,u3,1,Unknown,\n";
        let mut rows = Vec::new();
        read_csv(csv.as_bytes(), |r| {
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
        assert!(read_csv("Name\nx\n".as_bytes(), |_| Ok(())).is_err());
        assert!(read_zip(std::io::Cursor::new(b"not a zip".to_vec())).is_err());
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
    fn the_job_asks_for_the_policy_by_a_quoted_id() {
        let body = job_request("o'brien");
        assert_eq!(body["filter"], "(PolicyId eq 'o''brien')");
        assert_eq!(body["reportName"], REPORT_NAME);
        assert_eq!(body["format"], "csv");
    }
}
