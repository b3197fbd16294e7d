//! The JSON summary of a delivery, in the contract's shape.

use serde::Serialize;

use crate::store::DeliveryRecord;
use crate::xml::{Authentication, Control, ErrorEntry, ResultEntry};

/// The JSON summary of one delivery (`Accept: application/json`, feed items).
#[derive(Debug, Serialize)]
pub struct Summary<'a> {
    /// The control-level controlid; `null` when unmatched.
    pub controlid: Option<&'a str>,
    /// Whether the delivery has a controlid.
    pub matched: bool,
    /// The policy it was posted to.
    pub policy: &'a str,
    /// Arrival time, RFC 3339 UTC with milliseconds.
    pub received_at: String,
    /// Body size in bytes.
    pub size: u64,
    /// SHA-256 of the body, hex.
    pub sha256: String,
    /// The opaque id of this delivery.
    pub delivery_id: String,
    /// How many deliveries the controlid has (1 for unmatched ones).
    pub deliveries: u32,
    /// Whether the whole document parsed.
    pub well_formed: bool,
    /// Why it did not, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parse_error: Option<&'a str>,
    /// The control block.
    pub control: Option<&'a Control>,
    /// The authentication block; `null` without an operation block.
    pub authentication: Option<&'a Authentication>,
    /// One entry per `<result>`.
    pub results: &'a [ResultEntry],
    /// `<errormessage>` entries under `<response>` and `<operation>`.
    pub errors: &'a [ErrorEntry],
}

impl<'a> Summary<'a> {
    /// The summary of `record`, which is one of `deliveries` deliveries of its controlid.
    pub fn new(record: &'a DeliveryRecord, deliveries: u32) -> Self {
        let x = &record.extracted;
        Self {
            controlid: x.controlid.as_deref(),
            matched: x.controlid.is_some(),
            policy: &record.policy,
            received_at: rfc3339_millis(record.received_at_ms),
            size: record.size,
            sha256: hex::encode(record.sha256),
            delivery_id: record.id.to_string(),
            deliveries,
            well_formed: x.well_formed,
            parse_error: x.parse_error.as_deref(),
            control: x.control.as_ref(),
            authentication: x.authentication.as_ref(),
            results: &x.results,
            errors: &x.errors,
        }
    }
}

/// Formats milliseconds since the epoch as `2026-12-03T19:00:00.123Z`.
pub fn rfc3339_millis(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => {
            let format = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            t.format(&format).unwrap_or_else(|_| ms.to_string())
        }
        Err(_) => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339_millis;

    #[test]
    fn formats_millis_in_utc() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_796_324_400_123),
            "2026-12-03T19:00:00.123Z"
        );
    }
}
