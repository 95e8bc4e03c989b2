//! A ready-made catalogue of event types, and an example of typed event
//! types an app can copy: account e-mails, security notifications and
//! credit events, each with its string name, parsing, and a classification
//! handlers can share.
//!
//! Event types are plain strings, so an app may use its own names or its
//! own enum; anything that converts into a `String` can name a handler or
//! an event.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A catalogue of event types: e-mails, notifications and credit events.
///
/// ```
/// use sqlite_outbox::catalog::OutboxEventType;
/// use sqlite_outbox::NewEvent;
///
/// let kind: OutboxEventType = "credit.spend".parse()?;
/// assert!(kind.is_credit_event());
/// let event = NewEvent::new(kind, serde_json::json!({"amount": 3}));
/// assert_eq!(event.event_type(), "credit.spend");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OutboxEventType {
    /// `email.verification`
    EmailVerification,
    /// `email.password_reset`
    EmailPasswordReset,
    /// `email.invite`
    EmailInvite,
    /// `email.instant_link`
    EmailInstantLink,
    /// `email.security_alert`
    EmailSecurityAlert,
    /// `email.account_deletion`
    EmailAccountDeletion,
    /// `notify.login_threshold`
    NotifyLoginThreshold,
    /// `notify.token_reuse`
    NotifyTokenReuse,
    /// `notify.role_change`
    NotifyRoleChange,
    /// `notify.owner_transfer`
    NotifyOwnerTransfer,
    /// `notify.admin_action`
    NotifyAdminAction,
    /// `credit.low_balance`
    CreditLowBalance,
    /// `credit.spend`
    CreditSpend,
    /// `credit.hold_expired`
    CreditHoldExpired,
    /// `credit.refund_requested`
    CreditRefundRequested,
}

impl OutboxEventType {
    /// Every kind in the catalogue.
    pub const ALL: [OutboxEventType; 15] = [
        Self::EmailVerification,
        Self::EmailPasswordReset,
        Self::EmailInvite,
        Self::EmailInstantLink,
        Self::EmailSecurityAlert,
        Self::EmailAccountDeletion,
        Self::NotifyLoginThreshold,
        Self::NotifyTokenReuse,
        Self::NotifyRoleChange,
        Self::NotifyOwnerTransfer,
        Self::NotifyAdminAction,
        Self::CreditLowBalance,
        Self::CreditSpend,
        Self::CreditHoldExpired,
        Self::CreditRefundRequested,
    ];

    /// The event type string stored with the event.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::EmailVerification => "email.verification",
            Self::EmailPasswordReset => "email.password_reset",
            Self::EmailInvite => "email.invite",
            Self::EmailInstantLink => "email.instant_link",
            Self::EmailSecurityAlert => "email.security_alert",
            Self::EmailAccountDeletion => "email.account_deletion",
            Self::NotifyLoginThreshold => "notify.login_threshold",
            Self::NotifyTokenReuse => "notify.token_reuse",
            Self::NotifyRoleChange => "notify.role_change",
            Self::NotifyOwnerTransfer => "notify.owner_transfer",
            Self::NotifyAdminAction => "notify.admin_action",
            Self::CreditLowBalance => "credit.low_balance",
            Self::CreditSpend => "credit.spend",
            Self::CreditHoldExpired => "credit.hold_expired",
            Self::CreditRefundRequested => "credit.refund_requested",
        }
    }

    /// True for the account e-mails.
    pub fn is_email(&self) -> bool {
        matches!(
            self,
            Self::EmailVerification
                | Self::EmailPasswordReset
                | Self::EmailInvite
                | Self::EmailInstantLink
                | Self::EmailSecurityAlert
                | Self::EmailAccountDeletion
        )
    }

    /// True for the security and administration notifications.
    pub fn is_notification(&self) -> bool {
        matches!(
            self,
            Self::NotifyLoginThreshold
                | Self::NotifyTokenReuse
                | Self::NotifyRoleChange
                | Self::NotifyOwnerTransfer
                | Self::NotifyAdminAction
        )
    }

    /// True for the credit events.
    pub fn is_credit_event(&self) -> bool {
        matches!(
            self,
            Self::CreditLowBalance
                | Self::CreditSpend
                | Self::CreditHoldExpired
                | Self::CreditRefundRequested
        )
    }
}

impl fmt::Display for OutboxEventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OutboxEventType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| Error::invalid(format!("{s:?} is not in the event catalogue")))
    }
}

impl From<OutboxEventType> for String {
    fn from(kind: OutboxEventType) -> String {
        kind.as_str().to_owned()
    }
}

impl AsRef<str> for OutboxEventType {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::OutboxEventType as T;
    use super::*;

    #[test]
    fn test_event_type_classification() {
        assert!(T::EmailVerification.is_email());
        assert!(T::EmailInvite.is_email());
        assert!(!T::NotifyRoleChange.is_email());
        assert!(T::NotifyTokenReuse.is_notification());
        assert!(!T::EmailInstantLink.is_notification());
    }

    #[test]
    fn test_credit_event_type_classification() {
        let credit = [
            T::CreditLowBalance,
            T::CreditSpend,
            T::CreditHoldExpired,
            T::CreditRefundRequested,
        ];
        for kind in credit {
            assert!(!kind.is_email(), "{kind}");
            assert!(!kind.is_notification(), "{kind}");
            assert!(kind.is_credit_event(), "{kind}");
        }
        assert!(!T::EmailVerification.is_credit_event());
        assert!(!T::NotifyRoleChange.is_credit_event());
    }

    #[test]
    fn test_credit_event_type_as_str() {
        assert_eq!(T::CreditLowBalance.as_str(), "credit.low_balance");
        assert_eq!(T::CreditSpend.as_str(), "credit.spend");
        assert_eq!(T::CreditHoldExpired.as_str(), "credit.hold_expired");
        assert_eq!(T::CreditRefundRequested.as_str(), "credit.refund_requested");
    }

    #[test]
    fn every_kind_is_in_exactly_one_class_and_parses_back() -> Result<()> {
        for kind in T::ALL {
            let classes = [
                kind.is_email(),
                kind.is_notification(),
                kind.is_credit_event(),
            ];
            assert_eq!(classes.iter().filter(|c| **c).count(), 1, "{kind}");
            assert_eq!(kind.as_str().parse::<T>()?, kind);
            assert_eq!(String::from(kind), kind.as_str());
            let prefix = kind.as_str().split('.').next().unwrap_or_default();
            assert_eq!(prefix == "email", kind.is_email());
            assert_eq!(prefix == "notify", kind.is_notification());
            assert_eq!(prefix == "credit", kind.is_credit_event());
        }
        assert!("email.unknown".parse::<T>().is_err());
        Ok(())
    }

    #[test]
    fn serde_names_are_the_snake_case_variants() {
        assert_eq!(
            serde_json::to_value(T::EmailPasswordReset).ok(),
            Some(serde_json::json!("email_password_reset"))
        );
    }
}
