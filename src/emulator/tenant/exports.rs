//! The tenant's side of the reports export API (`emulator/reports.rs` says what is modelled and
//! from which documents): the routes, the report built from the device model when a job
//! completes, the blob it is downloaded from, and `GET /_emulator/exportJobs/{id}/truth`, the
//! per-scope counts the tests compare a client's with — computed from the job's snapshot of the
//! device model, not from the CSV.

use axum::body::Bytes;
use serde_json::{Value, json};

use super::{Call, Request, Response, Tenant, graph_error, guid, throttled};
use crate::domain::time::Timestamp;
use crate::emulator::intune::{
    DEVICE_GROUP, DEVICE_GROUP_BIT, Status, device_groups, device_users,
};
use crate::emulator::reports::{self, Built, Job, Row, SnapshotRow};
use crate::provider::simulator::fleet::group_bit;

impl Tenant {
    /// Where the blobs are served (the second listener's origin).
    pub fn set_blob_origin(&mut self, origin: String) {
        self.blob_origin = origin;
    }

    /// `deviceManagement/reports/exportJobs` routes; `None` when the path is not one.
    pub(super) fn export_route(&mut self, call: &Call, segments: &[&str]) -> Option<Response> {
        let job_id = match segments {
            ["deviceManagement", "reports", "exportJobs"] => None,
            ["deviceManagement", "reports", "exportJobs", id] => Some(id.to_string()),
            ["deviceManagement", "reports", key] => Some(
                key.strip_prefix("exportJobs('")?
                    .strip_suffix("')")?
                    .to_string(),
            ),
            _ => return None,
        };
        let now = self.now();
        if let Some(wait) = self.exports.throttle(now) {
            return Some(throttled(now, call.request_id).header("Retry-After", wait.to_string()));
        }
        let meta = call.metadata();
        Some(match (call.method, job_id) {
            ("POST", None) => self.create_export(call, &meta),
            ("GET", Some(id)) => self.export_job(&id, call, &meta),
            _ => graph_error(
                405,
                "BadRequest",
                "The export API takes POST on the collection and GET on a job.",
                now,
                call.request_id,
            ),
        })
    }

    fn create_export(&mut self, call: &Call, meta: &str) -> Response {
        let now = self.now();
        let request = match reports::parse_request(call.body) {
            Ok(r) => r,
            Err(message) => return graph_error(400, "BadRequest", &message, now, call.request_id),
        };
        let (platform, rows) = match request.report {
            reports::Report::PolicyDevices => {
                let Some(policy) = self.policies.iter().find(|p| p.id == request.policy_id) else {
                    return graph_error(
                        400,
                        "BadRequest",
                        &format!("No compliance policy has the id '{}'.", request.policy_id),
                        now,
                        call.request_id,
                    );
                };
                (policy.platform, self.intune.listed(policy.platform).len())
            }
            // Every managed device; the platform is the job's only for the truth route.
            reports::Report::DeviceCompliance => (
                crate::domain::plan::Platform::Windows,
                self.fleet.device_count(),
            ),
        };
        let id = format!(
            "{}_{}",
            request.report.name(),
            guid(self.settings.seed, "export", self.exports.jobs.len())
        );
        let job = Job {
            id,
            request,
            platform,
            requested: now,
            rows,
            built: None,
        };
        let body = job.json(meta, &self.blob_origin, now);
        self.exports.jobs.push(job);
        Response::json(201, body)
    }

    fn export_job(&mut self, id: &str, call: &Call, meta: &str) -> Response {
        let now = self.now();
        let Some(idx) = self.exports.jobs.iter().position(|j| j.id == id) else {
            return graph_error(
                404,
                "ResourceNotFound",
                &format!("No export job has the id '{id}'."),
                now,
                call.request_id,
            );
        };
        if self.exports.jobs[idx].built.is_none() && now >= self.exports.jobs[idx].ready_at() {
            match self.build(idx, now) {
                Ok(built) => self.exports.jobs[idx].built = Some(built),
                Err(e) => {
                    return graph_error(500, "InternalError", &e, now, call.request_id);
                }
            }
            self.exports.keep_recent();
        }
        Response::json(
            200,
            self.exports.jobs[idx].json(meta, &self.blob_origin, now),
        )
    }

    /// The report as the device model stands now: its zip, and the snapshot behind it.
    fn build(&self, idx: usize, now: Timestamp) -> Result<Built, String> {
        let job = &self.exports.jobs[idx];
        if job.request.report == reports::Report::DeviceCompliance {
            return self.build_compliance(job, now);
        }
        let platform = job.platform;
        let policy = self
            .policies
            .iter()
            .find(|p| p.id == job.request.policy_id)
            .ok_or("the job's policy was deleted")?;
        let seed = self.settings.seed;
        let snapshot: Vec<SnapshotRow> = self
            .intune
            .listed(platform)
            .iter()
            .map(|&device| {
                let row = self.intune.row(platform, device as usize);
                SnapshotRow {
                    device,
                    status: row.status,
                    last_reported: row.last_reported.map_or(i64::MIN, Timestamp::as_millis),
                    grace_end: row.grace_end.map_or(i64::MIN, Timestamp::as_millis),
                }
            })
            .collect();
        let users = self.fleet.user_count();
        let prefix = platform.as_str().to_uppercase();
        // Each device's rows: its primary user's (or one without a user), then a second user's.
        let rows = snapshot.iter().flat_map(|s| {
            let device = s.device as usize;
            let (owner, _) = self.fleet.device_owner(device);
            let who = device_users(seed, owner, users, device);
            let device_id = guid(seed, "device", device);
            let aad_device_id = super::aad_device_id(seed, device);
            let name = format!("{prefix}-{device:07}");
            let grace = (s.grace_end != i64::MIN).then(|| Timestamp::from_millis(s.grace_end));
            let status = reports::policy_status(s.status, grace, now);
            let last =
                (s.last_reported != i64::MIN).then(|| Timestamp::from_millis(s.last_reported));
            [Some(who.primary), who.second.map(Some)]
                .into_iter()
                .flatten()
                .map(move |user| {
                    let (user_id, upn) = match user {
                        Some(u) => (self.user_id(u), self.user_principal_name(u)),
                        None => (String::new(), String::new()),
                    };
                    Row {
                        device_id: device_id.clone(),
                        aad_device_id: aad_device_id.clone(),
                        device_name: name.clone(),
                        user_id,
                        upn,
                        status,
                        last_contact: last,
                    }
                })
        });
        let file = format!("{}.csv", job.id);
        let bytes = reports::write_zip(&file, &job.request, &policy.id, rows)?;
        let blob = format!("{}.zip", job.id);
        let sig = guid(seed, "sas", &blob).replace('-', "");
        Ok(Built {
            blob,
            sig,
            bytes,
            snapshot,
            at: now,
            platform,
        })
    }

    /// The `DeviceCompliance` report: every device of the fleet once, with its primary user, its
    /// overall state and the end of its grace. A device is judged by its platform's policy when
    /// that policy covers it, otherwise by the tenant's "Mark devices with no compliance policy
    /// assigned as" (`secureByDefault`: noncompliant when set). No snapshot: the truth route
    /// counts the per-policy report.
    fn build_compliance(&self, job: &Job, now: Timestamp) -> Result<Built, String> {
        use crate::emulator::reports::ComplianceRow;
        let seed = self.settings.seed;
        let users = self.fleet.user_count();
        let uncovered = if self.compliance_settings()["secureByDefault"] == true {
            "noncompliant"
        } else {
            "compliant"
        };
        let rows = (0..self.fleet.device_count()).map(|device| {
            let (owner, platform) = self.fleet.device_owner(device);
            let who = device_users(seed, owner, users, device);
            let covered = self
                .intune
                .listed(platform)
                .binary_search(&(device as u32))
                .is_ok();
            let (state, grace_until, last_contact) = if covered {
                let row = self.intune.row(platform, device);
                let in_grace = row.grace_end.is_some_and(|g| g > now);
                let state = match row.status {
                    Status::Unknown => "unknown",
                    Status::Compliant => "compliant",
                    Status::NonCompliant if in_grace => "inGracePeriod",
                    Status::NonCompliant => "noncompliant",
                    Status::Error => "error",
                    Status::Conflict => "conflict",
                };
                (state, row.grace_end, row.last_reported)
            } else {
                (uncovered, None, None)
            };
            let (user_id, upn) = match who.primary {
                Some(u) => (self.user_id(u), self.user_principal_name(u)),
                None => (String::new(), String::new()),
            };
            ComplianceRow {
                device_id: guid(seed, "device", device),
                device_name: format!("{}-{device:07}", platform.as_str().to_uppercase()),
                user_id,
                upn,
                state,
                grace_until,
                last_contact,
            }
        });
        let file = format!("{}.csv", job.id);
        let bytes = reports::write_compliance_zip(&file, &job.request, rows)?;
        let blob = format!("{}.zip", job.id);
        let sig = guid(seed, "sas", &blob).replace('-', "");
        Ok(Built {
            blob,
            sig,
            bytes,
            snapshot: Vec::new(),
            at: now,
            platform: job.platform,
        })
    }

    /// A blob's bytes for `GET {blob origin}/reports/{name}?...&sig=...`, or the Azure Storage
    /// error (status, XML body).
    pub fn blob(
        &self,
        name: &str,
        query: &[(String, String)],
        authorized: bool,
    ) -> Result<Bytes, (u16, String)> {
        let denied = |why: &str| (403, reports::storage_error("AuthenticationFailed", why));
        if authorized {
            // A SAS URL authorizes the request itself; a bearer token beside it is refused.
            return Err(denied(
                "Server failed to authenticate the request. The request carries both a shared access signature and an Authorization header.",
            ));
        }
        let Some(job) = self.exports.blob(name) else {
            return Err((
                404,
                reports::storage_error("BlobNotFound", "The specified blob does not exist."),
            ));
        };
        let built = job.built.as_ref().expect("a blob's job is built");
        let sig = query
            .iter()
            .find(|(k, _)| k == "sig")
            .map(|(_, v)| v.as_str());
        if sig != Some(built.sig.as_str()) {
            return Err(denied("Signature did not match."));
        }
        if job.expires_at().is_some_and(|e| self.now() >= e) || built.bytes.is_empty() {
            return Err(denied("Signed expiry time has passed."));
        }
        Ok(built.bytes.clone())
    }

    /// `GET /_emulator/exportJobs/{id}/truth?include=A,B&exclude=C&stale_after=SECONDS`: the
    /// counts of the job's devices in that scope, from the snapshot the job was built from.
    pub(super) fn export_truth(&self, id: &str, request: &Request) -> Response {
        // `latest`: the per-policy job completed last.
        let job = if id == "latest" {
            self.exports
                .jobs
                .iter()
                .filter(|j| j.built.is_some() && j.request.report == reports::Report::PolicyDevices)
                .max_by_key(|j| j.built.as_ref().map(|b| b.at))
        } else {
            self.exports.jobs.iter().find(|j| j.id == id)
        };
        let Some(job) = job else {
            return Response::json(404, json!({"error": "no such export job"}));
        };
        let Some(built) = job.built.as_ref() else {
            return Response::json(409, json!({"error": "the job has not completed"}));
        };
        let q = |name: &str| {
            request
                .query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .unwrap_or("")
        };
        let bits = |names: &str| -> Result<u16, String> {
            names
                .split(',')
                .filter(|n| !n.is_empty())
                .map(|n| {
                    if n == DEVICE_GROUP {
                        return Ok(DEVICE_GROUP_BIT);
                    }
                    group_bit(n).ok_or(format!("no group `{n}`"))
                })
                .try_fold(0u16, |acc, b| b.map(|b| acc | b))
        };
        let (include, exclude) = match (bits(q("include")), bits(q("exclude"))) {
            (Ok(i), Ok(e)) => (i, e),
            (Err(e), _) | (_, Err(e)) => return Response::json(400, json!({"error": e})),
        };
        let stale_after = q("stale_after").parse::<u64>().unwrap_or(u64::MAX / 4_000);
        let Some(threshold_days) = self.checkin_threshold_days() else {
            return Response::json(500, json!({"error": "no compliance validity period"}));
        };
        Response::json(
            200,
            truth(self, built, include, exclude, stale_after, threshold_days),
        )
    }

    /// The tenant's compliance status validity period, in days.
    fn checkin_threshold_days(&self) -> Option<i64> {
        self.compliance_settings()["deviceComplianceCheckinThresholdDays"].as_i64()
    }
}

/// The counts of one scope in a built job, by Intune's rules, from the snapshot.
fn truth(
    tenant: &Tenant,
    built: &Built,
    include: u16,
    exclude: u16,
    stale_after_secs: u64,
    threshold_days: i64,
) -> Value {
    let seed = tenant.settings.seed;
    let users = tenant.fleet.user_count();
    let at = built.at.as_millis();
    let validity = at - threshold_days * 86_400_000;
    let horizon = at.saturating_sub((stale_after_secs.min(i64::MAX as u64 / 2_000) * 1000) as i64);
    let mut counts = [0u64; 8];
    let mut userless = 0u64;
    let mut shared = 0u64;
    // Placed by a device group: all of them, and those without a primary user.
    let mut by_group = 0u64;
    let mut userless_by_group = 0u64;
    for row in &built.snapshot {
        let device = row.device as usize;
        let (owner, _) = tenant.fleet.device_owner(device);
        let who = device_users(seed, owner, users, device);
        // A device group of the scope places the device whoever its users are; otherwise its
        // users do, and a userless device is counted apart.
        let by_device = device_groups(seed, &tenant.fleet, device);
        if by_device & exclude != 0 {
            continue;
        }
        let in_scope = |u: usize| {
            let g = tenant.fleet.user_groups(u);
            g & include != 0 && g & exclude == 0
        };
        if by_device & include == 0 {
            let Some(primary) = who.primary else {
                userless += 1;
                continue;
            };
            if !(in_scope(primary) || who.second.is_some_and(in_scope)) {
                continue;
            }
        } else {
            by_group += 1;
            userless_by_group += u64::from(who.primary.is_none());
        }
        shared += u64::from(who.second.is_some());
        // 0 compliant, 1 noncompliant, 2 in grace, 3 error, 4 conflict, 5 unknown, 6 stale.
        let slot = if row.status == Status::Unknown || row.last_reported == i64::MIN {
            5
        } else if row.last_reported < validity {
            1
        } else if row.last_reported < horizon {
            6
        } else {
            match row.status {
                Status::Compliant => 0,
                Status::NonCompliant if row.grace_end != i64::MIN && row.grace_end > at => 2,
                Status::NonCompliant => 1,
                Status::Error => 3,
                Status::Conflict => 4,
                Status::Unknown => 5,
            }
        };
        counts[slot] += 1;
    }
    json!({
        "at": built.at.rfc3339(),
        "platform": built.platform.as_str(),
        "targeted": counts.iter().sum::<u64>(),
        "compliant": counts[0],
        "noncompliant": counts[1],
        "in_grace": counts[2],
        "errors": counts[3],
        "conflicts": counts[4],
        "unknown": counts[5],
        "stale": counts[6],
        "userless": userless,
        "shared": shared,
        "by_device_group": by_group,
        "userless_by_device_group": userless_by_group,
    })
}
