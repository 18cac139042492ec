//! The one place where the client core's types meet their protobuf form: failure
//! categories, file kinds, checkpoints, and errors carried inside a `tonic::Status`.
//!
//! An error crossing the wire keeps what a caller decides on: its [`Category`] and whether
//! it is retryable travel as `fhirhaul-category` / `fhirhaul-retryable` metadata beside the
//! gRPC code, so a worker learns that the EHR refused the client (auth, not retryable) as
//! such, and not as a flaky network.

use fhirhaul_common::download::{Checkpoint, Validator};
use fhirhaul_common::manifest::FileKind;
use fhirhaul_common::{Category, Error};
use tonic::{Code, Status};

use crate::v1 as pb;

/// Metadata key of an error's category (its lowercase name).
pub const CATEGORY_METADATA: &str = "fhirhaul-category";
/// Metadata key of whether an error is retryable (`true` / `false`).
pub const RETRYABLE_METADATA: &str = "fhirhaul-retryable";

impl From<Category> for pb::FailureCategory {
    fn from(category: Category) -> Self {
        match category {
            Category::Network => pb::FailureCategory::Network,
            Category::Throttled => pb::FailureCategory::Throttled,
            Category::Server => pb::FailureCategory::Server,
            Category::Rejected => pb::FailureCategory::Rejected,
            Category::Auth => pb::FailureCategory::Auth,
            Category::Protocol => pb::FailureCategory::Protocol,
            Category::Content => pb::FailureCategory::Content,
            Category::Timeout => pb::FailureCategory::Timeout,
            Category::Storage => pb::FailureCategory::Storage,
            Category::Config => pb::FailureCategory::Config,
            Category::Cancelled => pb::FailureCategory::Cancelled,
            Category::Incomplete => pb::FailureCategory::Incomplete,
            Category::Expired => pb::FailureCategory::Expired,
        }
    }
}

/// A wire value that names no known category (unspecified, or from a newer peer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failure category {0} is not one this coordinator knows")]
pub struct UnknownCategory(pub i32);

impl TryFrom<pb::FailureCategory> for Category {
    type Error = UnknownCategory;

    fn try_from(value: pb::FailureCategory) -> Result<Self, Self::Error> {
        Ok(match value {
            pb::FailureCategory::Network => Category::Network,
            pb::FailureCategory::Throttled => Category::Throttled,
            pb::FailureCategory::Server => Category::Server,
            pb::FailureCategory::Rejected => Category::Rejected,
            pb::FailureCategory::Auth => Category::Auth,
            pb::FailureCategory::Protocol => Category::Protocol,
            pb::FailureCategory::Content => Category::Content,
            pb::FailureCategory::Timeout => Category::Timeout,
            pb::FailureCategory::Storage => Category::Storage,
            pb::FailureCategory::Config => Category::Config,
            pb::FailureCategory::Cancelled => Category::Cancelled,
            pb::FailureCategory::Incomplete => Category::Incomplete,
            pb::FailureCategory::Expired => Category::Expired,
            pb::FailureCategory::Unspecified => return Err(UnknownCategory(0)),
        })
    }
}

/// The category an `i32` field of a message names.
pub fn category_from_wire(value: i32) -> Result<Category, UnknownCategory> {
    pb::FailureCategory::try_from(value)
        .map_err(|_| UnknownCategory(value))
        .and_then(|c| Category::try_from(c).map_err(|_| UnknownCategory(value)))
}

/// The wire value of a category, for an `i32` field.
pub fn category_to_wire(category: Category) -> i32 {
    pb::FailureCategory::from(category) as i32
}

impl From<FileKind> for pb::FileKind {
    fn from(kind: FileKind) -> Self {
        match kind {
            FileKind::Output => pb::FileKind::Output,
            FileKind::Deleted => pb::FileKind::Deleted,
            FileKind::Error => pb::FileKind::Error,
        }
    }
}

/// A wire value that names no file kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("file kind {0} is not output, deleted or error")]
pub struct UnknownFileKind(pub i32);

/// The file kind an `i32` field names.
pub fn file_kind_from_wire(value: i32) -> Result<FileKind, UnknownFileKind> {
    match pb::FileKind::try_from(value) {
        Ok(pb::FileKind::Output) => Ok(FileKind::Output),
        Ok(pb::FileKind::Deleted) => Ok(FileKind::Deleted),
        Ok(pb::FileKind::Error) => Ok(FileKind::Error),
        _ => Err(UnknownFileKind(value)),
    }
}

impl From<&Checkpoint> for pb::Checkpoint {
    fn from(checkpoint: &Checkpoint) -> Self {
        let validator = checkpoint.validator.clone().unwrap_or_default();
        pb::Checkpoint {
            offset: checkpoint.offset,
            lines: checkpoint.lines,
            resources: checkpoint.resources,
            etag: validator.etag,
            last_modified: validator.last_modified,
        }
    }
}

impl From<pb::Checkpoint> for Checkpoint {
    fn from(checkpoint: pb::Checkpoint) -> Self {
        let validator = (checkpoint.etag.is_some() || checkpoint.last_modified.is_some()).then_some(Validator {
            etag: checkpoint.etag,
            last_modified: checkpoint.last_modified,
        });
        Checkpoint {
            offset: checkpoint.offset,
            lines: checkpoint.lines,
            resources: checkpoint.resources,
            validator,
        }
    }
}

/// Puts an error's category and retryability on a status.
pub fn with_error_kind(mut status: Status, category: Category, retryable: bool) -> Status {
    let metadata = status.metadata_mut();
    metadata.insert(
        CATEGORY_METADATA,
        tonic::metadata::MetadataValue::from_static(category.as_str()),
    );
    metadata.insert(
        RETRYABLE_METADATA,
        tonic::metadata::MetadataValue::from_static(if retryable { "true" } else { "false" }),
    );
    status
}

/// The category and retryability a status carries: as the peer stated them, or, for a
/// status with none (a transport failure, an older peer), as its code suggests.
pub fn error_kind(status: &Status) -> (Category, bool) {
    let stated_category = status
        .metadata()
        .get(CATEGORY_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Category>().ok());
    let stated_retryable = status
        .metadata()
        .get(RETRYABLE_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<bool>().ok());
    let (category, retryable) = match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::ResourceExhausted => {
            (Category::Network, true)
        }
        Code::Unauthenticated | Code::PermissionDenied => (Category::Config, false),
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::OutOfRange => {
            (Category::Config, false)
        }
        Code::Aborted => (Category::Cancelled, false),
        _ => (Category::Protocol, false),
    };
    (
        stated_category.unwrap_or(category),
        stated_retryable.unwrap_or(retryable),
    )
}

/// The client core's error for a failed call to `from` (a component name such as "the
/// coordinator"), keeping the peer's category, retryability and words.
pub fn error_from_status(status: &Status, from: &'static str) -> Error {
    let (category, retryable) = error_kind(status);
    Error::Relayed {
        from,
        category,
        retryable,
        message: status.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_round_trips_through_the_wire() {
        for category in Category::ALL {
            assert_eq!(category_from_wire(category_to_wire(category)), Ok(category));
        }
        assert_eq!(category_from_wire(0), Err(UnknownCategory(0)));
        assert_eq!(category_from_wire(99), Err(UnknownCategory(99)));
    }

    #[test]
    fn every_file_kind_round_trips_through_the_wire() {
        for kind in [FileKind::Output, FileKind::Deleted, FileKind::Error] {
            assert_eq!(file_kind_from_wire(pb::FileKind::from(kind) as i32), Ok(kind));
        }
        assert!(file_kind_from_wire(0).is_err());
    }

    #[test]
    fn checkpoints_keep_their_validator() {
        let checkpoint = Checkpoint {
            offset: 10,
            lines: 2,
            resources: 2,
            validator: Some(Validator {
                etag: Some("\"v1\"".into()),
                last_modified: None,
            }),
        };
        assert_eq!(Checkpoint::from(pb::Checkpoint::from(&checkpoint)), checkpoint);
        let bare = Checkpoint {
            validator: None,
            ..checkpoint
        };
        assert_eq!(Checkpoint::from(pb::Checkpoint::from(&bare)), bare);
    }

    #[test]
    fn a_stated_error_kind_wins_over_the_code() {
        // The coordinator could not get a token because the EHR refused the client: the
        // code says "unavailable", the error says "auth, do not retry".
        let status = with_error_kind(Status::unavailable("invalid_client"), Category::Auth, false);
        let error = error_from_status(&status, "the coordinator");
        assert_eq!(error.category(), Category::Auth);
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("invalid_client"), "{error}");
    }

    #[test]
    fn a_bare_transport_failure_is_a_retryable_network_error() {
        let error = error_from_status(&Status::unavailable("connection refused"), "the coordinator");
        assert_eq!(error.category(), Category::Network);
        assert!(error.is_retryable());
        let error = error_from_status(&Status::not_found("unknown tenant"), "the coordinator");
        assert!(!error.is_retryable());
    }
}
