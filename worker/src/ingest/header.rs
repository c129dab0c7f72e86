//! An `UploadHeader` judged before anything is stored: every field bounded,
//! the destination checked as an UploadJob's is, and turned into the job
//! spec the request is registered with. Pure: tested without services.

use stowage_common::spec::{
    ChecksumAlgorithm, ConflictPolicy, Destination, Endpoint, IngestSource, MAX_PART_SIZE,
    MAX_PARTS, MAX_REGION_CHARS, RetryPolicy, SecretRef, UploadJobSpec, UploadSource,
    validate_bucket, validate_endpoint, validate_key, validate_secret_name,
};
use stowage_proto::v1::{IngestConflictPolicy, IngestDestination, UploadHeader};

use crate::config::IngestArgs;

/// Most characters of a request id.
pub const MAX_REQUEST_ID_CHARS: usize = 128;
/// Most characters of a namespace (a DNS label).
const MAX_NAMESPACE_CHARS: usize = 63;
/// Most characters of a content type.
const MAX_CONTENT_TYPE_CHARS: usize = 255;

/// A header that cannot be served, said per field.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("size {size} is above this worker's maximum object size, {max} bytes")]
    TooLarge { size: u64, max: u64 },
}

fn invalid(field: &'static str, message: impl Into<String>) -> HeaderError {
    HeaderError::Invalid {
        field,
        message: message.into(),
    }
}

/// What a valid header asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub namespace: String,
    pub request_id: String,
    pub key: String,
    pub size: u64,
    pub offset: u64,
    pub source: IngestSource,
    /// The job the request is registered as (`source.ingest` = `source`).
    pub spec: UploadJobSpec,
}

pub fn plan(h: UploadHeader, limits: &IngestArgs) -> Result<Plan, HeaderError> {
    if h.request_id.is_empty()
        || h.request_id.chars().count() > MAX_REQUEST_ID_CHARS
        || !h
            .request_id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(&c))
    {
        return Err(invalid(
            "request_id",
            format!("must be 1 to {MAX_REQUEST_ID_CHARS} of A-Z a-z 0-9 . _ : -"),
        ));
    }
    validate_namespace(&h.namespace)?;
    let (destination, key) = destination(h.destination)?;
    if h.size > limits.max_object_bytes {
        return Err(HeaderError::TooLarge {
            size: h.size,
            max: limits.max_object_bytes,
        });
    }
    let content_type = h.content_type.trim();
    if content_type.chars().count() > MAX_CONTENT_TYPE_CHARS
        || content_type.chars().any(char::is_control)
    {
        return Err(invalid(
            "content_type",
            format!("at most {MAX_CONTENT_TYPE_CHARS} characters, no control characters"),
        ));
    }
    let sha256 = h.sha256.to_ascii_lowercase();
    if !sha256.is_empty() && (sha256.len() != 64 || !sha256.bytes().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(invalid("sha256", "must be 64 hexadecimal digits, or empty"));
    }
    if h.dedup && sha256.is_empty() {
        return Err(invalid(
            "dedup",
            "needs the object's sha256 in the header (it is what is looked up)",
        ));
    }
    let conflict_policy = match IngestConflictPolicy::try_from(h.conflict_policy) {
        Ok(IngestConflictPolicy::Overwrite) => ConflictPolicy::Overwrite,
        Ok(IngestConflictPolicy::Skip) => ConflictPolicy::Skip,
        Ok(IngestConflictPolicy::Version) => ConflictPolicy::Version,
        Err(_) => {
            return Err(invalid(
                "conflict_policy",
                format!("unknown value {}", h.conflict_policy),
            ));
        }
    };
    let part_size = part_size_for(h.size, limits.part_size);
    if h.offset > h.size || !h.offset.is_multiple_of(part_size) {
        return Err(invalid(
            "offset",
            format!(
                "{} is not a resume point: 0, or the resume_offset Status answers",
                h.offset
            ),
        ));
    }
    let source = IngestSource {
        request_id: h.request_id.clone(),
        size: h.size,
        sha256: Some(sha256).filter(|s| !s.is_empty()),
        content_type: Some(content_type.to_string()).filter(|c| !c.is_empty()),
    };
    let spec = UploadJobSpec {
        source: UploadSource {
            s3: None,
            http: None,
            ingest: Some(source.clone()),
        },
        destination,
        part_size_bytes: part_size,
        concurrency: limits.concurrency,
        conflict_policy,
        dedup: h.dedup,
        checksum: ChecksumAlgorithm::Crc32c,
        retry: RetryPolicy::default(),
    };
    Ok(Plan {
        namespace: h.namespace,
        request_id: h.request_id,
        key,
        size: h.size,
        offset: h.offset,
        source,
        spec,
    })
}

/// A namespace name (a DNS label).
pub fn validate_namespace(namespace: &str) -> Result<(), HeaderError> {
    let dns_label = namespace.len() <= MAX_NAMESPACE_CHARS
        && namespace
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && namespace
            .bytes()
            .next()
            .zip(namespace.bytes().last())
            .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    if dns_label {
        Ok(())
    } else {
        Err(invalid(
            "namespace",
            "must be a Kubernetes namespace name (a DNS label)",
        ))
    }
}

/// The store and bucket an object goes to, checked as an UploadJob's
/// destination is, and its key.
pub fn destination(d: Option<IngestDestination>) -> Result<(Destination, String), HeaderError> {
    let d = d.ok_or_else(|| invalid("destination", "is required"))?;
    let spec_error = |field: &'static str| {
        move |e: stowage_common::spec::SpecError| invalid(field, e.to_string())
    };
    validate_bucket("bucket", &d.bucket).map_err(spec_error("destination.bucket"))?;
    validate_key(&d.key).map_err(|e| invalid("destination.key", e.to_string()))?;
    if d.region.chars().count() > MAX_REGION_CHARS {
        return Err(invalid(
            "destination.region",
            format!("longer than {MAX_REGION_CHARS} characters"),
        ));
    }
    if !d.credentials_secret.is_empty() {
        validate_secret_name("credentials_secret", &d.credentials_secret)
            .map_err(spec_error("destination.credentials_secret"))?;
    }
    let endpoint = Endpoint {
        endpoint: Some(d.endpoint).filter(|e| !e.is_empty()),
        region: Some(d.region)
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "us-east-1".into()),
        force_path_style: !d.virtual_hosted_style,
        credentials_secret_ref: Some(d.credentials_secret)
            .filter(|s| !s.is_empty())
            .map(|name| SecretRef { name }),
        use_worker_credentials: d.use_worker_credentials,
        allow_private_networks: d.allow_private_networks,
    };
    validate_endpoint("endpoint", &endpoint).map_err(spec_error("destination.endpoint"))?;
    let destination = Destination {
        bucket: d.bucket,
        key_prefix: String::new(),
        endpoint,
        encryption: None,
    };
    Ok((destination, d.key))
}

/// The configured part size, or the smallest whole MiB that keeps `size`
/// within S3's 10,000 parts.
pub fn part_size_for(size: u64, configured: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let needed = size.div_ceil(MAX_PARTS).div_ceil(MIB).saturating_mul(MIB);
    configured.max(needed).min(MAX_PART_SIZE)
}

/// Whether a stored request and a new header ask for the same upload (what
/// the part size or concurrency is may differ between workers).
pub fn same_request(stored: &UploadJobSpec, stored_key: &str, plan: &Plan) -> bool {
    stored.source.ingest.as_ref() == Some(&plan.source)
        && stored.destination == plan.spec.destination
        && stored.conflict_policy == plan.spec.conflict_policy
        && stored.dedup == plan.spec.dedup
        && stored_key == plan.key
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        ingest: IngestArgs,
    }

    fn limits() -> IngestArgs {
        Args::parse_from(["test", "--ingest-max-object-bytes", "1000000000"]).ingest
    }

    fn header() -> UploadHeader {
        UploadHeader {
            request_id: "req-1".into(),
            namespace: "team-a".into(),
            destination: Some(IngestDestination {
                bucket: "docs".into(),
                key: "a/b.txt".into(),
                ..Default::default()
            }),
            size: 10,
            ..Default::default()
        }
    }

    fn field_of(h: UploadHeader) -> &'static str {
        match plan(h, &limits()) {
            Err(HeaderError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn a_plain_header_becomes_a_job_spec() {
        let p = plan(header(), &limits()).expect("test setup");
        assert_eq!(p.key, "a/b.txt");
        assert_eq!(p.spec.destination.bucket, "docs");
        assert_eq!(p.spec.destination.endpoint.region, "us-east-1");
        assert!(p.spec.destination.endpoint.force_path_style);
        assert_eq!(p.source.size, 10);
        assert_eq!(p.spec.part_size_bytes, 16 << 20);
    }

    #[test]
    fn hostile_values_name_their_field() {
        let mut h = header();
        h.request_id = "a/../b".into();
        assert_eq!(field_of(h), "request_id");
        let mut h = header();
        h.request_id = "x".repeat(129);
        assert_eq!(field_of(h), "request_id");
        let mut h = header();
        h.namespace = "Team_A".into();
        assert_eq!(field_of(h), "namespace");
        let mut h = header();
        h.destination.as_mut().expect("test setup").key = "../etc/passwd".into();
        assert_eq!(field_of(h), "destination.key");
        let mut h = header();
        h.destination.as_mut().expect("test setup").key = "a/\0b".into();
        assert_eq!(field_of(h), "destination.key");
        let mut h = header();
        h.destination.as_mut().expect("test setup").bucket = "B".into();
        assert_eq!(field_of(h), "destination.bucket");
        let mut h = header();
        h.destination.as_mut().expect("test setup").endpoint = "http://user:pw@host".into();
        assert_eq!(field_of(h), "destination.endpoint");
        let mut h = header();
        h.destination
            .as_mut()
            .expect("test setup")
            .credentials_secret = "../x".into();
        assert_eq!(field_of(h), "destination.credentials_secret");
        let mut h = header();
        h.destination = None;
        assert_eq!(field_of(h), "destination");
        let mut h = header();
        h.sha256 = "abc".into();
        assert_eq!(field_of(h), "sha256");
        let mut h = header();
        h.dedup = true;
        assert_eq!(field_of(h), "dedup");
        let mut h = header();
        h.conflict_policy = 99;
        assert_eq!(field_of(h), "conflict_policy");
        let mut h = header();
        h.content_type = "text/plain\r\nX-Evil: 1".into();
        assert_eq!(field_of(h), "content_type");
        let mut h = header();
        h.offset = 11;
        assert_eq!(field_of(h), "offset");
        let mut h = header();
        h.size = 100 << 20;
        h.offset = 1 << 20;
        assert_eq!(field_of(h), "offset");
        let mut h = header();
        h.size = u64::MAX;
        assert!(matches!(
            plan(h, &limits()),
            Err(HeaderError::TooLarge { .. })
        ));
    }

    #[test]
    fn part_size_grows_to_keep_within_ten_thousand_parts() {
        assert_eq!(part_size_for(0, 16 << 20), 16 << 20);
        assert_eq!(part_size_for(1 << 40, 16 << 20), 105 << 20);
        assert_eq!(part_size_for(5 << 40, 16 << 20), 525 << 20);
        assert!(part_size_for(u64::MAX, 16 << 20) <= MAX_PART_SIZE);
        assert!((1u64 << 40).div_ceil(part_size_for(1 << 40, 16 << 20)) <= MAX_PARTS);
    }

    #[test]
    fn the_same_request_is_recognised_and_another_is_not() {
        let p = plan(header(), &limits()).expect("test setup");
        assert!(same_request(&p.spec, "a/b.txt", &p));
        let mut h = header();
        h.size = 11;
        let other = plan(h, &limits()).expect("test setup");
        assert!(!same_request(&other.spec, &other.key, &p));
        assert!(!same_request(&p.spec, "a/c.txt", &p));
    }
}
