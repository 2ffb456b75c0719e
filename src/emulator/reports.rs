//! Intune's reports export API, as the emulator models it: `POST
//! /deviceManagement/reports/exportJobs` queues a job, `GET .../exportJobs('{id}')` reports it
//! `notStarted`, `inProgress`, then `completed` with a `url` to a zip holding one CSV file, served
//! by a separate blob origin that takes a shared-access signature in the URL and no bearer token.
//!
//! What is modelled, and from where:
//! - the job's shape, its statuses and `localizationType` ("Export Intune reports using Graph
//!   APIs", learn.microsoft.com/mem/intune/fundamentals/reports-export-graph-apis; the
//!   deviceManagementExportJob resource, learn.microsoft.com/graph/api/resources/
//!   intune-reporting-devicemanagementexportjob; deviceManagementExportJobLocalizationType);
//! - two of the reports listed in "Intune reports and properties available using Graph API"
//!   (learn.microsoft.com/intune/device-management/reports/ref-graph-available-reports), each
//!   with a subset of the columns that page lists for it (a documented column the device model
//!   has no value for is refused as an unknown one):
//!   - `DeviceStatusByCompliacePolicyReport` (Microsoft's spelling): documented columns
//!     `AadDeviceId, DeviceId, DeviceName, LastContact, ManagementAgents, OS, PolicyId,
//!     PolicyStatus, UPN, UserId, UserName`; modelled `DeviceId, DeviceName, UserId, UPN,
//!     PolicyId, PolicyStatus, LastContact, AadDeviceId`. The page lists no filter for it, yet the report is
//!     one policy's (the admin center's per-policy view); the emulator takes `(PolicyId eq
//!     '<id>')` and needs it. `PolicyStatus` is numbered as third-party exporters read it
//!     (1 unknown, 2 compliant, 3 in grace period, 4 noncompliant, 5 error, 6 conflict, 7 not
//!     applicable): Microsoft documents the column, not its numbers;
//!   - `DeviceCompliance` ("Device Compliance Org", every managed device's overall state):
//!     modelled columns `DeviceId, DeviceName, UserId, UPN, ComplianceState,
//!     InGracePeriodUntil, LastContact`, no filter. `ComplianceState` is written with the
//!     managedDevice `complianceState` names (Microsoft documents the column, not its
//!     encoding); `InGracePeriodUntil` is the end of the device's grace for a noncompliant
//!     device, `9999-12-31T23:59:59Z` (the managedDevice "never" value) otherwise;
//! - throttling: the export API's 100 requests per tenant and 48 per app per minute
//!   (tenant-safety reference §5, after the export documentation), answered with `429` and a
//!   `Retry-After` in seconds;
//! - the download: an Azure Storage blob URL with a SAS (`sv`, `sr`, `se`, `sp`, `sig`), refused
//!   with `403 AuthenticationFailed` when its signature is wrong or expired, or when a request
//!   also carries an `Authorization` header (Azure Storage error codes,
//!   learn.microsoft.com/rest/api/storageservices/common-rest-api-error-codes).
//!
//! Microsoft documents no delay; the emulator queues a job for [`QUEUED`] and builds it for
//! [`BUILD_BASE`] plus [`BUILD_PER_100K`] per 100,000 rows, in tenant time, so a client has to
//! poll. The CSV is written row by row from the device model into the zip's compressor: the
//! emulator never holds the report's text, only its compressed bytes (the blob).

use std::collections::VecDeque;
use std::io::{Cursor, Write};
use std::time::Duration;

use axum::body::Bytes;
use serde_json::{Value, json};

use crate::domain::time::Timestamp;
use crate::emulator::intune::Status;
use crate::graph::format_time;

pub const REPORT_NAME: &str = "DeviceStatusByCompliacePolicyReport";
/// The per-policy report's modelled columns, in the order a CSV without `select` has them.
pub const COLUMNS: [&str; 8] = [
    "DeviceId",
    "DeviceName",
    "UserId",
    "UPN",
    "PolicyId",
    "PolicyStatus",
    "LastContact",
    "AadDeviceId",
];
pub const COMPLIANCE_REPORT: &str = "DeviceCompliance";
/// The `DeviceCompliance` report's modelled columns.
pub const COMPLIANCE_COLUMNS: [&str; 7] = [
    "DeviceId",
    "DeviceName",
    "UserId",
    "UPN",
    "ComplianceState",
    "InGracePeriodUntil",
    "LastContact",
];
/// `InGracePeriodUntil` of a device not in grace (the managedDevice "never expires" value).
pub const NO_GRACE: &str = "9999-12-31T23:59:59Z";

/// Which of the modelled reports a job is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// `DeviceStatusByCompliacePolicyReport`: one policy's devices.
    PolicyDevices,
    /// `DeviceCompliance`: every device's overall state and grace end.
    DeviceCompliance,
}

impl Report {
    pub fn name(self) -> &'static str {
        match self {
            Report::PolicyDevices => REPORT_NAME,
            Report::DeviceCompliance => COMPLIANCE_REPORT,
        }
    }

    pub fn columns(self) -> &'static [&'static str] {
        match self {
            Report::PolicyDevices => &COLUMNS,
            Report::DeviceCompliance => &COMPLIANCE_COLUMNS,
        }
    }
}
/// The one column with a localized value.
const LOCALIZED: &str = "PolicyStatus";

pub const QUEUED: Duration = Duration::from_secs(5);
pub const BUILD_BASE: Duration = Duration::from_secs(20);
pub const BUILD_PER_100K: Duration = Duration::from_secs(10);
/// How long a completed job's download stays valid.
pub const EXPIRY: Duration = Duration::from_secs(6 * 3600);
/// Requests per app per minute on the export API.
pub const PER_APP_PER_MINUTE: usize = 48;
/// Completed jobs whose blobs are kept; older ones expire early (bounded memory).
const KEPT: usize = 4;

/// A device's state in the report, with what the truth route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotRow {
    pub device: u32,
    pub status: Status,
    pub last_reported: i64,
    /// The end of its grace, for a noncompliant device (`i64::MIN`: none).
    pub grace_end: i64,
}

/// One CSV row's values, before `select` (the policy's columns are the same on every row).
pub struct Row {
    pub device_id: String,
    /// Its Entra device id (the directory's `deviceId`).
    pub aad_device_id: String,
    pub device_name: String,
    /// Empty for a device without a primary user.
    pub user_id: String,
    pub upn: String,
    pub status: u8,
    pub last_contact: Option<Timestamp>,
}

/// The report's `PolicyStatus` for a device's evaluation at `now`.
pub fn policy_status(status: Status, grace_end: Option<Timestamp>, now: Timestamp) -> u8 {
    match status {
        Status::Unknown => 1,
        Status::Compliant => 2,
        Status::NonCompliant if grace_end.is_some_and(|g| g > now) => 3,
        Status::NonCompliant => 4,
        Status::Error => 5,
        Status::Conflict => 6,
    }
}

fn localized(status: u8) -> &'static str {
    match status {
        2 => "Compliant",
        3 => "In grace period",
        4 => "Not compliant",
        5 => "Error",
        6 => "Conflict",
        7 => "Not applicable",
        _ => "Unknown",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Localization {
    AdditionalColumn,
    Replace,
}

/// What a job asks for, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub report: Report,
    /// The policy of a per-policy report; empty for `DeviceCompliance`.
    pub policy_id: String,
    pub filter: String,
    /// Indexes into the report's columns, in the order asked.
    pub select: Vec<usize>,
    pub localization: Localization,
}

/// Reads a `POST .../exportJobs` body, or says why the service would refuse it.
pub fn parse_request(body: Option<&Value>) -> Result<Request, String> {
    let body = body
        .and_then(Value::as_object)
        .ok_or("A JSON object is required.")?;
    let name = body
        .get("reportName")
        .and_then(Value::as_str)
        .ok_or("reportName is required.")?;
    let report = match name {
        REPORT_NAME => Report::PolicyDevices,
        COMPLIANCE_REPORT => Report::DeviceCompliance,
        _ => {
            return Err(format!(
                "The report '{name}' is not available for export here."
            ));
        }
    };
    match body.get("format").and_then(Value::as_str) {
        None | Some("csv") => {}
        Some(other) => {
            return Err(format!(
                "Format '{other}' is not supported for this report."
            ));
        }
    }
    let localization = match body.get("localizationType").and_then(Value::as_str) {
        None | Some("localizedValuesAsAdditionalColumn") => Localization::AdditionalColumn,
        Some("replaceLocalizableValues") => Localization::Replace,
        Some(other) => return Err(format!("Invalid localizationType '{other}'.")),
    };
    let filter = body
        .get("filter")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if filter.len() > 2000 {
        return Err("The filter is longer than 2000 characters.".into());
    }
    let policy_id = match report {
        Report::PolicyDevices => policy_filter(&filter)
            .ok_or("This report needs a filter of the form (PolicyId eq '<id>').")?,
        Report::DeviceCompliance if filter.trim().is_empty() => String::new(),
        Report::DeviceCompliance => {
            return Err("The emulator models this report without a filter.".into());
        }
    };
    let columns = report.columns();
    let select = match body.get("select") {
        None | Some(Value::Null) => (0..columns.len()).collect(),
        Some(Value::Array(names)) if names.len() <= 256 => names
            .iter()
            .map(|n| {
                let n = n.as_str().unwrap_or_default();
                columns
                    .iter()
                    .position(|c| c.eq_ignore_ascii_case(n))
                    .ok_or(format!("Invalid select column '{n}'."))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("select must be an array of at most 256 column names.".into()),
    };
    Ok(Request {
        report,
        policy_id,
        filter,
        select,
        localization,
    })
}

/// `(PolicyId eq 'x')` or `PolicyId eq 'x'` → `x`.
fn policy_filter(filter: &str) -> Option<String> {
    let inner = filter.trim();
    let inner = inner
        .strip_prefix('(')
        .and_then(|f| f.strip_suffix(')'))
        .unwrap_or(inner)
        .trim();
    let (key, value) = inner.split_once(" eq ")?;
    if !key.trim().eq_ignore_ascii_case("PolicyId") {
        return None;
    }
    let value = value.trim().strip_prefix('\'')?.strip_suffix('\'')?;
    (!value.is_empty() && !value.contains('\'')).then(|| value.to_string())
}

/// A completed job's result.
pub struct Built {
    pub blob: String,
    pub sig: String,
    pub bytes: Bytes,
    pub snapshot: Vec<SnapshotRow>,
    pub at: Timestamp,
    pub platform: crate::domain::plan::Platform,
}

pub struct Job {
    pub id: String,
    pub request: Request,
    pub platform: crate::domain::plan::Platform,
    pub requested: Timestamp,
    pub rows: usize,
    pub built: Option<Built>,
}

impl Job {
    /// When it leaves `notStarted` and when it is `completed`.
    pub fn started_at(&self) -> Timestamp {
        self.requested.plus(QUEUED)
    }

    pub fn ready_at(&self) -> Timestamp {
        let per = BUILD_PER_100K.as_millis() as i64 * self.rows as i64 / 100_000;
        Timestamp::from_millis(self.started_at().as_millis() + BUILD_BASE.as_millis() as i64 + per)
    }

    pub fn expires_at(&self) -> Option<Timestamp> {
        self.built.as_ref().map(|b| b.at.plus(EXPIRY))
    }

    fn status(&self, now: Timestamp) -> &'static str {
        if self.built.is_some() {
            "completed"
        } else if now >= self.started_at() {
            "inProgress"
        } else {
            "notStarted"
        }
    }

    /// The job as `GET .../exportJobs('{id}')` returns it.
    pub fn json(&self, meta: &str, blob_origin: &str, now: Timestamp) -> Value {
        let columns = self.request.report.columns();
        let select: Vec<&str> = self.request.select.iter().map(|&i| columns[i]).collect();
        let url = self.built.as_ref().map(|b| {
            let expiry = format_time(b.at.plus(EXPIRY));
            format!(
                "{blob_origin}/reports/{}?sv=2019-07-07&sr=b&sp=r&se={}&sig={}",
                b.blob,
                crate::graph::encode_query_value(&expiry),
                b.sig
            )
        });
        json!({
            "@odata.context": format!("{meta}#deviceManagement/reports/exportJobs/$entity"),
            "id": self.id,
            "reportName": self.request.report.name(),
            "filter": self.request.filter,
            "select": select,
            "format": "csv",
            "snapshotId": null,
            "localizationType": match self.request.localization {
                Localization::AdditionalColumn => "localizedValuesAsAdditionalColumn",
                Localization::Replace => "replaceLocalizableValues",
            },
            "status": self.status(now),
            "url": url,
            "requestDateTime": format_time(self.requested),
            "expirationDateTime": self.expires_at().map_or(crate::graph::UNSET_TIME.to_string(), format_time),
        })
    }
}

/// Every export job of the tenant, and the export API's request window.
#[derive(Default)]
pub struct Exports {
    pub jobs: Vec<Job>,
    window: VecDeque<Timestamp>,
}

impl Exports {
    /// Counts a request against the per-app limit; `Some(seconds)` to wait when over it.
    pub fn throttle(&mut self, now: Timestamp) -> Option<u64> {
        let minute = now.minus(Duration::from_secs(60));
        while self.window.front().is_some_and(|t| *t <= minute) {
            self.window.pop_front();
        }
        if self.window.len() >= PER_APP_PER_MINUTE {
            let oldest = self.window.front().copied().unwrap_or(now);
            let wait = oldest.plus(Duration::from_secs(60)).since(now);
            return Some(wait.as_secs().max(1));
        }
        self.window.push_back(now);
        None
    }

    /// Drops the blobs of all but the latest [`KEPT`] completed jobs.
    pub fn keep_recent(&mut self) {
        let mut built: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| self.jobs[i].built.is_some())
            .collect();
        built.sort_by_key(|&i| std::cmp::Reverse(self.jobs[i].built.as_ref().map(|b| b.at)));
        for &i in built.iter().skip(KEPT) {
            if let Some(b) = self.jobs[i].built.as_mut() {
                b.bytes = Bytes::new();
                b.snapshot = Vec::new();
            }
        }
    }

    pub fn blob(&self, name: &str) -> Option<&Job> {
        self.jobs
            .iter()
            .find(|j| j.built.as_ref().is_some_and(|b| b.blob == name))
    }
}

/// One `DeviceCompliance` row's values, before `select`.
pub struct ComplianceRow {
    pub device_id: String,
    pub device_name: String,
    pub user_id: String,
    pub upn: String,
    /// The managedDevice `complianceState` name.
    pub state: &'static str,
    pub grace_until: Option<Timestamp>,
    pub last_contact: Option<Timestamp>,
}

type CsvOut<'a> = csv::Writer<&'a mut zip::ZipWriter<Cursor<Vec<u8>>>>;

/// A zip of one CSV file, its rows streamed into the compressor by `write`.
fn zip_csv(
    file_name: &str,
    write: impl FnOnce(&mut CsvOut<'_>) -> Result<(), csv::Error>,
) -> Result<Bytes, String> {
    use zip::write::SimpleFileOptions;
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(1))
        .large_file(true);
    zip.start_file(file_name, options)
        .map_err(|e| e.to_string())?;
    {
        let mut csv = csv::WriterBuilder::new()
            .buffer_capacity(1 << 16)
            .from_writer(&mut zip);
        write(&mut csv).map_err(|e| e.to_string())?;
        csv.flush().map_err(|e| e.to_string())?;
    }
    zip.flush().map_err(|e| e.to_string())?;
    let cursor = zip.finish().map_err(|e| e.to_string())?;
    Ok(Bytes::from(cursor.into_inner()))
}

/// Writes the per-policy report's zip: one CSV file, rows streamed into the compressor.
pub fn write_zip(
    file_name: &str,
    request: &Request,
    policy_id: &str,
    rows: impl Iterator<Item = Row>,
) -> Result<Bytes, String> {
    zip_csv(file_name, |csv| {
        let mut header: Vec<&str> = Vec::new();
        for &i in &request.select {
            header.push(COLUMNS[i]);
            if COLUMNS[i] == LOCALIZED && request.localization == Localization::AdditionalColumn {
                header.push("PolicyStatus_loc");
            }
        }
        csv.write_record(&header)?;
        let mut time = String::new();
        let mut number = String::new();
        for row in rows {
            time.clear();
            if let Some(t) = row.last_contact {
                time.push_str(&format_time(t));
            }
            number.clear();
            number.push((b'0' + row.status.min(9)) as char);
            for &i in &request.select {
                let value: &str = match i {
                    0 => &row.device_id,
                    1 => &row.device_name,
                    2 => &row.user_id,
                    3 => &row.upn,
                    4 => policy_id,
                    5 if request.localization == Localization::Replace => localized(row.status),
                    5 => &number,
                    6 => &time,
                    _ => &row.aad_device_id,
                };
                csv.write_field(value)?;
                if i == 5 && request.localization == Localization::AdditionalColumn {
                    csv.write_field(localized(row.status))?;
                }
            }
            csv.write_record(None::<&[u8]>)?;
        }
        Ok(())
    })
}

/// Writes the `DeviceCompliance` report's zip.
pub fn write_compliance_zip(
    file_name: &str,
    request: &Request,
    rows: impl Iterator<Item = ComplianceRow>,
) -> Result<Bytes, String> {
    zip_csv(file_name, |csv| {
        let header: Vec<&str> = request
            .select
            .iter()
            .map(|&i| COMPLIANCE_COLUMNS[i])
            .collect();
        csv.write_record(&header)?;
        let (mut grace, mut last) = (String::new(), String::new());
        for row in rows {
            grace.clear();
            grace.push_str(&row.grace_until.map_or(NO_GRACE.to_string(), format_time));
            last.clear();
            if let Some(t) = row.last_contact {
                last.push_str(&format_time(t));
            }
            for &i in &request.select {
                let value: &str = match i {
                    0 => &row.device_id,
                    1 => &row.device_name,
                    2 => &row.user_id,
                    3 => &row.upn,
                    4 => row.state,
                    5 => &grace,
                    _ => &last,
                };
                csv.write_field(value)?;
            }
            csv.write_record(None::<&[u8]>)?;
        }
        Ok(())
    })
}

/// The Azure Storage error document.
pub fn storage_error(code: &str, message: &str) -> String {
    format!(
        "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_names_the_report_its_policy_and_known_columns() {
        let ok = parse_request(Some(&json!({
            "reportName": REPORT_NAME,
            "filter": "(PolicyId eq 'abc')",
            "select": ["DeviceId", "UserId", "PolicyStatus", "LastContact"],
            "format": "csv",
            "localizationType": "localizedValuesAsAdditionalColumn",
        })))
        .unwrap();
        assert_eq!(ok.policy_id, "abc");
        assert_eq!(ok.select, vec![0, 2, 5, 6]);
        let all = parse_request(Some(&json!({
            "reportName": COMPLIANCE_REPORT,
            "select": ["DeviceId", "InGracePeriodUntil"],
        })))
        .unwrap();
        assert_eq!(
            (all.report, all.select),
            (Report::DeviceCompliance, vec![0, 5])
        );
        for bad in [
            json!({"reportName": "Devices", "filter": "(PolicyId eq 'abc')"}),
            json!({"reportName": REPORT_NAME}),
            json!({"reportName": REPORT_NAME, "filter": "(PolicyId eq 'abc')", "select": ["Nope"]}),
            json!({"reportName": REPORT_NAME, "filter": "(PolicyId eq 'abc')", "format": "xml"}),
            json!({"reportName": REPORT_NAME, "filter": "(OwnerType eq '1')"}),
            // Not a column of Microsoft's list for this report.
            json!({"reportName": REPORT_NAME, "filter": "(PolicyId eq 'abc')", "select": ["PolicyName"]}),
            json!({"reportName": COMPLIANCE_REPORT, "select": ["PolicyStatus"]}),
        ] {
            assert!(parse_request(Some(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_zip_holds_one_csv_with_the_selected_columns() {
        let request = parse_request(Some(&json!({
            "reportName": REPORT_NAME,
            "filter": "(PolicyId eq 'p')",
            "select": ["DeviceId", "UserId", "PolicyStatus"],
        })))
        .unwrap();
        let rows = (0..3).map(|i| Row {
            device_id: ["d0", "d1", "d2"][i].into(),
            aad_device_id: "a".into(),
            device_name: "n".into(),
            user_id: ["u0", "", "u2"][i].into(),
            upn: "x".into(),
            status: [2, 4, 3][i],
            last_contact: None,
        });
        let bytes = write_zip("r.csv", &request, "p", rows).unwrap();
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes.to_vec())).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut archive.by_index(0).unwrap(), &mut text).unwrap();
        assert_eq!(
            text,
            "DeviceId,UserId,PolicyStatus,PolicyStatus_loc\nd0,u0,2,Compliant\nd1,,4,Not compliant\nd2,u2,3,In grace period\n"
        );
    }

    #[test]
    fn the_compliance_zip_dates_the_grace_of_a_device_in_grace_only() {
        let request = parse_request(Some(&json!({
            "reportName": COMPLIANCE_REPORT,
            "select": ["DeviceId", "ComplianceState", "InGracePeriodUntil"],
        })))
        .unwrap();
        let end = Timestamp::parse_rfc3339("2026-12-01T10:00:00Z").unwrap();
        let rows = (0..2).map(|i| ComplianceRow {
            device_id: ["d0", "d1"][i].into(),
            device_name: "n".into(),
            user_id: "u".into(),
            upn: "x".into(),
            state: ["inGracePeriod", "compliant"][i],
            grace_until: [Some(end), None][i],
            last_contact: None,
        });
        let bytes = write_compliance_zip("c.csv", &request, rows).unwrap();
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes.to_vec())).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut archive.by_index(0).unwrap(), &mut text).unwrap();
        assert_eq!(
            text,
            format!(
                "DeviceId,ComplianceState,InGracePeriodUntil\nd0,inGracePeriod,{}\nd1,compliant,{NO_GRACE}\n",
                format_time(end)
            )
        );
    }

    #[test]
    fn the_api_answers_429_past_48_requests_a_minute() {
        let mut exports = Exports::default();
        let t = Timestamp::from_millis(1_000_000);
        for _ in 0..PER_APP_PER_MINUTE {
            assert_eq!(exports.throttle(t), None);
        }
        assert_eq!(exports.throttle(t), Some(60));
        assert_eq!(exports.throttle(t.plus(Duration::from_secs(61))), None);
    }
}
