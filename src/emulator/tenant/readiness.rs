//! The tenant's MDM set-up, as the readiness preflight reads it: verified domains, the Apple MDM
//! push certificate, the tenant-wide compliance settings, the templates' localized messages and
//! the application roles its tokens carry. `ready` (the default) is a tenant set up as
//! Microsoft's guidance asks; `unready` seeds one of each mistake, so a preflight can be
//! rehearsed both ways (`--readiness`, `--apns-expiry`, `--verified-domain`, `--roles`).

use std::str::FromStr;

use super::*;

/// Which seeded set-up the tenant has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    #[default]
    Ready,
    /// An expired push certificate, `wipe` actions in the Windows and iOS policies' schedules,
    /// a template without a message in its default locale, "Mark devices with no compliance
    /// policy assigned as: Compliant", and no `Policy.ReadWrite.ConditionalAccess` role.
    Unready,
}

impl FromStr for Variant {
    type Err = String;

    fn from_str(text: &str) -> Result<Variant, String> {
        match text {
            "ready" => Ok(Variant::Ready),
            "unready" => Ok(Variant::Unready),
            other => Err(format!("unknown readiness {other:?} (ready, unready)")),
        }
    }
}

/// The Apple MDM push certificate the tenant has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Apns {
    /// As the variant says: valid for a year from the clock's start (`ready`), expired two days
    /// before it (`unready`).
    #[default]
    AsVariant,
    /// None uploaded: the endpoint answers 404.
    Absent,
    /// Expires at this instant.
    At(Timestamp),
}

impl Apns {
    /// `none`, a duration after the clock's start (`10d`), or before it (`-2d`).
    pub fn parse(text: &str) -> Result<Apns, String> {
        let text = text.trim();
        if text == "none" {
            return Ok(Apns::Absent);
        }
        let (before, span) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let span = humantime::parse_duration(span.trim()).map_err(|e| {
            format!("invalid --apns-expiry `{text}` ({e}): expected `none`, `10d` or `-2d`")
        })?;
        if span > Duration::from_secs(100 * 365 * 86_400) {
            return Err(format!(
                "--apns-expiry `{text}` is more than 100 years away"
            ));
        }
        Ok(Apns::At(if before {
            SIMULATED_EPOCH.minus(span)
        } else {
            SIMULATED_EPOCH.plus(span)
        }))
    }
}

/// `--readiness` and the flags that adjust it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    pub variant: Variant,
    /// Custom domains verified besides the initial `*.onmicrosoft.com` one.
    pub domains: Vec<String>,
    pub apns: Apns,
    /// The application roles granted; `None`: as the variant says.
    pub roles: Option<Vec<String>>,
}

/// Every application permission phasegate documents (docs/graph.md).
pub const ALL_ROLES: [&str; 11] = [
    "DeviceManagementConfiguration.ReadWrite.All",
    "DeviceManagementServiceConfig.Read.All",
    "DeviceManagementManagedDevices.Read.All",
    "Policy.Read.All",
    "Policy.ReadWrite.ConditionalAccess",
    "Application.Read.All",
    "GroupMember.Read.All",
    "User.Read.All",
    "Organization.Read.All",
    "AuditLog.Read.All",
    "Directory.Read.All",
];

/// The `wipe` action the unready variant adds: 30 days after noncompliance.
pub const UNREADY_WIPE_HOURS: i64 = 720;

impl Readiness {
    pub fn roles(&self) -> Vec<String> {
        match (&self.roles, self.variant) {
            (Some(roles), _) => roles.clone(),
            (None, Variant::Ready) => ALL_ROLES.iter().map(|r| r.to_string()).collect(),
            (None, Variant::Unready) => ALL_ROLES
                .iter()
                .filter(|r| **r != "Policy.ReadWrite.ConditionalAccess")
                .map(|r| r.to_string())
                .collect(),
        }
    }

    fn apns_expiry(&self) -> Option<Timestamp> {
        match (self.apns, self.variant) {
            (Apns::Absent, _) => None,
            (Apns::At(at), _) => Some(at),
            (Apns::AsVariant, Variant::Ready) => {
                Some(SIMULATED_EPOCH.plus(Duration::from_secs(365 * 86_400)))
            }
            (Apns::AsVariant, Variant::Unready) => {
                Some(SIMULATED_EPOCH.minus(Duration::from_secs(2 * 86_400)))
            }
        }
    }
}

/// The `unready` variant's destructive actions, added when the tenant is built.
pub(super) fn seed(tenant: &mut Tenant) {
    if tenant.setup.readiness.variant != Variant::Unready {
        return;
    }
    let seed = tenant.settings.seed;
    for policy in &mut tenant.policies {
        if matches!(policy.platform, Platform::Windows | Platform::Ios) {
            let id = guid(seed, "wipe-action", &policy.id);
            policy.actions.push((
                id,
                json!({
                    "actionType": "wipe",
                    "gracePeriodHours": UNREADY_WIPE_HOURS,
                    "notificationTemplateId": NIL_GUID,
                    "notificationMessageCCList": [],
                }),
            ));
        }
    }
}

impl Tenant {
    /// The claims of an access token: an app-only token carries the granted application
    /// permissions in `roles`, the tenant in `tid`, the app in `appid`
    /// (learn.microsoft.com/entra/identity-platform/access-token-claims-reference).
    pub(super) fn token_claims(&self, issued: u64, now: Timestamp, expires: Timestamp) -> Value {
        json!({
            "aud": "https://graph.microsoft.com",
            "iss": format!("https://sts.windows.net/{}/", self.tenant_id),
            "iat": now.as_millis() / 1000,
            "nbf": now.as_millis() / 1000,
            "exp": expires.as_millis() / 1000,
            "appid": self.settings.client_id,
            "idtyp": "app",
            "tid": self.tenant_id,
            "roles": self.setup.readiness.roles(),
            "uti": guid(self.settings.seed, "token", issued),
            "ver": "1.0",
        })
    }

    /// `GET /organization` (learn.microsoft.com/graph/api/organization-list): one organization
    /// whose `verifiedDomains` are the initial domain and the custom ones.
    pub(super) fn organization(&self, meta: &str) -> Response {
        let initial = &self.settings.tenant_domain;
        let mut domains = vec![json!({
            "capabilities": "Email, OfficeCommunicationsOnline",
            "isDefault": self.setup.readiness.domains.is_empty(),
            "isInitial": true,
            "name": initial,
            "type": "Managed",
        })];
        for (i, name) in self.setup.readiness.domains.iter().enumerate() {
            domains.push(json!({
                "capabilities": "Email, OfficeCommunicationsOnline, Intune",
                "isDefault": i == 0,
                "isInitial": false,
                "name": name,
                "type": "Managed",
            }));
        }
        Response::json(
            200,
            json!({
                "@odata.context": format!("{meta}#organization"),
                "value": [{
                    "id": self.tenant_id,
                    "displayName": "Contoso",
                    "verifiedDomains": domains,
                }],
            }),
        )
    }

    /// `GET /deviceManagement/applePushNotificationCertificate`
    /// (learn.microsoft.com/graph/api/intune-devices-applepushnotificationcertificate-get); a
    /// tenant that never uploaded one answers 404, as the service does.
    pub(super) fn apns_certificate(&self, meta: &str, request_id: &str) -> Response {
        let now = self.now();
        let Some(expires) = self.setup.readiness.apns_expiry() else {
            return intune_error(
                404,
                "ResourceNotFound",
                "Resource not found: applePushNotificationCertificate",
                now,
                request_id,
            );
        };
        let seed = self.settings.seed;
        Response::json(
            200,
            json!({
                "@odata.context": format!("{meta}#deviceManagement/applePushNotificationCertificate/$entity"),
                "@odata.type": "#microsoft.graph.applePushNotificationCertificate",
                "id": guid(seed, "apns", "certificate"),
                "appleIdentifier": "mdm-admin@contoso.com",
                "topicIdentifier": "com.apple.mgmt.External.3b2e1c4d-5f60-4a7b-8c9d-0e1f2a3b4c5d",
                "lastModifiedDateTime": format_time(expires.minus(Duration::from_secs(365 * 86_400))),
                "expirationDateTime": format_time(expires),
                "certificateUploadStatus": "Succeeded",
                "certificateUploadFailureReason": null,
                "certificateSerialNumber": hex::encode(&Sha256::digest(format!("{seed}:apns"))[..8]),
                "certificate": null,
            }),
        )
    }

    /// "Mark devices with no compliance policy assigned as" Not compliant.
    pub(super) fn secure_by_default(&self) -> bool {
        self.compliance_settings()["secureByDefault"] == true
    }

    /// The tenant-wide compliance settings, `deviceManagement`'s `settings`
    /// (learn.microsoft.com/graph/api/resources/intune-deviceconfig-devicemanagementsettings).
    pub(super) fn compliance_settings(&self) -> Value {
        json!({
            "deviceComplianceCheckinThresholdDays": 30,
            "isScheduledActionEnabled": true,
            "secureByDefault": self.setup.readiness.variant == Variant::Ready,
        })
    }

    /// `GET /deviceManagement` (learn.microsoft.com/graph/api/intune-deviceconfig-devicemanagement-get),
    /// `$select` honoured for its two properties here.
    pub(super) fn device_management(&self, meta: &str, select: Option<&str>) -> Response {
        let wanted = |p: &str| select.is_none_or(|s| s.split(',').any(|x| x.trim() == p));
        let mut body = json!({"@odata.context": format!("{meta}#deviceManagement")});
        if wanted("id") {
            body["id"] = json!(guid(self.settings.seed, "deviceManagement", "singleton"));
        }
        if wanted("settings") {
            body["settings"] = self.compliance_settings();
        }
        Response::json(200, body)
    }

    /// `GET /deviceManagement/notificationMessageTemplates/{id}/localizedNotificationMessages`
    /// (learn.microsoft.com/graph/api/intune-notification-localizednotificationmessage-list).
    pub(super) fn localized_messages(&self, id: &str, meta: &str, request_id: &str) -> Response {
        let now = self.now();
        let Some((_, name)) = self.templates.iter().find(|(t, _)| t == id) else {
            return intune_error(
                404,
                "ResourceNotFound",
                &format!("Resource not found: notificationMessageTemplate {id}"),
                now,
                request_id,
            );
        };
        let message = |locale: &str, is_default: bool, subject: &str, body: &str| {
            json!({
                "@odata.type": "#microsoft.graph.localizedNotificationMessage",
                "id": guid(self.settings.seed, "message", format!("{id}:{locale}")),
                "lastModifiedDateTime": format_time(SIMULATED_EPOCH),
                "locale": locale,
                "subject": subject,
                "messageTemplate": body,
                "isDefault": is_default,
            })
        };
        let messages = match self.setup.readiness.variant {
            Variant::Ready => vec![message(
                "en-us",
                true,
                &format!("{name}: your device needs attention"),
                "Your device does not meet the company's compliance policy. Open Company Portal to see what to fix.",
            )],
            // The default locale (en-us) has none: only a German message, not the default.
            Variant::Unready => vec![message(
                "de-de",
                false,
                "Ihr Gerät erfüllt die Richtlinie nicht",
                "Öffnen Sie das Unternehmensportal, um zu sehen, was zu tun ist.",
            )],
        };
        Response::json(
            200,
            json!({
                "@odata.context": format!("{meta}#deviceManagement/notificationMessageTemplates('{id}')/localizedNotificationMessages"),
                "value": messages,
            }),
        )
    }
}
