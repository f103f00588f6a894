//! S3 Object Lock (`storage.object_lock`): a store that writes through the S3 API itself where `object_store`
//! cannot, and reads through `object_store`.
//!
//! - **Writes** (`put_opts`) send `Content-MD5` (buckets with Object Lock require an integrity header, and
//!   some S3 implementations accept only this one), the conditional headers of the commit protocol
//!   (`If-None-Match: *` for a create, `If-Match` for an update), and the lock a writer asked for: an
//!   [`ObjectLock`] in the put's `extensions` becomes `x-amz-object-lock-mode` (the configured mode),
//!   `-retain-until-date` and `-legal-hold`. A put without one is written unlocked (key records, for
//!   example, must stay deletable so that crypto-shredding works: a bucket default retention would lock them).
//! - **Deletes** remove every version of the key, not only the current one: on a versioned bucket a plain
//!   delete only adds a delete marker and keeps the bytes. A version still under retention or a legal hold
//!   is refused by S3 (403), and the delete fails with `PermissionDenied` naming the object.
//! - Everything else (gets, lists, copies) goes to the `object_store` S3 client; so do multipart uploads,
//!   which are refused when they ask for a lock (chatvault writes every locked object in one put).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{ObjectLockLegalHoldStatus, ObjectLockMode, ObjectLockRetentionMode};
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use md5::{Digest, Md5};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use tokio::sync::OnceCell;

use crate::config::LockMode;

/// What a writer asks of one object's lock (put it in [`PutOptions::extensions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ObjectLock {
    /// Keep every version until then (microseconds since the Unix epoch); `None`: no retention date.
    pub retain_until_micros: Option<i64>,
    /// Set the legal-hold flag (no expiry; removed explicitly).
    pub legal_hold: bool,
}

impl ObjectLock {
    /// Whether this asks for anything.
    pub fn is_some(&self) -> bool {
        self.retain_until_micros.is_some() || self.legal_hold
    }

    /// The later date and either hold of two locks (a manifest's lock covers its files').
    pub fn union(self, other: ObjectLock) -> ObjectLock {
        ObjectLock {
            retain_until_micros: match (self.retain_until_micros, other.retain_until_micros) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
            legal_hold: self.legal_hold || other.legal_hold,
        }
    }

    /// `options` asking for this lock.
    pub fn put_options(self, mut options: PutOptions) -> PutOptions {
        if self.is_some() {
            options.extensions.insert(self);
        }
        options
    }
}

/// The lock on one object's current version, as S3 reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct LockStatus {
    /// `GOVERNANCE` or `COMPLIANCE` while a retention date is set.
    pub mode: Option<String>,
    pub retain_until_micros: Option<i64>,
    pub legal_hold: bool,
}

impl LockStatus {
    /// Whether S3 refuses to delete the version at `now_micros`.
    pub fn blocks_deletion(&self, now_micros: i64) -> bool {
        self.legal_hold
            || self
                .retain_until_micros
                .is_some_and(|until| until > now_micros)
    }
}

/// What `chatvault doctor` learns of a bucket ([`LockingS3::inspect_bucket`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BucketReport {
    pub bucket: String,
    pub object_lock_enabled: bool,
    /// The bucket's default retention rule, if it has one (it would lock key records too, which then
    /// cannot be shredded).
    pub default_retention: Option<String>,
    /// `Enabled`, `Suspended`, or absent (never enabled).
    pub versioning: Option<String>,
    /// What could not be read or written, one line each.
    pub errors: Vec<String>,
}

/// Where the S3 client finds the bucket, taken from `storage.options` (the `object_store` names) and the
/// environment.
#[derive(Clone)]
pub(crate) struct S3Settings {
    pub bucket: String,
    /// The key prefix of `s3://bucket/prefix` (empty: none).
    pub prefix: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub virtual_hosted: bool,
}

/// The store of the module documentation. Clones share one S3 client.
#[derive(Clone)]
pub struct LockingS3 {
    inner: Arc<dyn ObjectStore>,
    settings: S3Settings,
    mode: LockMode,
    /// Made on first use; shared, so that a clone (each delete stream holds one) does not load the AWS
    /// configuration and credentials again.
    client: Arc<OnceCell<aws_sdk_s3::Client>>,
}

impl fmt::Debug for LockingS3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockingS3")
            .field("bucket", &self.settings.bucket)
            .field("prefix", &self.settings.prefix)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for LockingS3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockingS3({}, {:?})", self.settings.bucket, self.mode)
    }
}

fn generic(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> object_store::Error {
    object_store::Error::Generic {
        store: "S3 (Object Lock)",
        source: error.into(),
    }
}

impl LockingS3 {
    /// `inner` reads the same bucket (and prefix) through `object_store`.
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, settings: S3Settings, mode: LockMode) -> Self {
        LockingS3 {
            inner,
            settings,
            mode,
            client: Arc::new(OnceCell::new()),
        }
    }

    fn key(&self, location: &Path) -> String {
        if self.settings.prefix.is_empty() {
            location.to_string()
        } else {
            format!("{}/{}", self.settings.prefix, location)
        }
    }

    pub fn bucket(&self) -> &str {
        &self.settings.bucket
    }

    /// The S3 client (made on first use: the standard credential chain is asynchronous).
    pub async fn client(&self) -> &aws_sdk_s3::Client {
        self.client
            .get_or_init(|| async {
                let http = aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https();
                let mut loader =
                    aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
                let settings = &self.settings;
                if let Some(region) = &settings.region {
                    loader = loader.region(aws_config::Region::new(region.clone()));
                }
                if let Some(endpoint) = &settings.endpoint {
                    loader = loader.endpoint_url(endpoint.clone());
                }
                if let (Some(id), Some(secret)) =
                    (&settings.access_key_id, &settings.secret_access_key)
                {
                    loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                        id.clone(),
                        secret.clone(),
                        None,
                        None,
                        "storage.options",
                    ));
                }
                let sdk = loader.load().await;
                let config = aws_sdk_s3::config::Builder::from(&sdk)
                    .force_path_style(!settings.virtual_hosted)
                    .build();
                aws_sdk_s3::Client::from_conf(config)
            })
            .await
    }

    /// Deletes every version of `location` (see the module documentation).
    pub async fn delete_versions(&self, location: &Path) -> object_store::Result<()> {
        let client = self.client().await;
        let key = self.key(location);
        let listed = client
            .list_object_versions()
            .bucket(&self.settings.bucket)
            .prefix(&key)
            .send()
            .await
            .map_err(|error| generic(describe("listing the versions of", &key, &error)))?;
        let mut versions: Vec<String> = listed
            .versions()
            .iter()
            .filter(|version| version.key() == Some(key.as_str()))
            .filter_map(|version| version.version_id().map(str::to_string))
            .collect();
        versions.extend(
            listed
                .delete_markers()
                .iter()
                .filter(|marker| marker.key() == Some(key.as_str()))
                .filter_map(|marker| marker.version_id().map(str::to_string)),
        );
        if versions.is_empty() {
            return Err(object_store::Error::NotFound {
                path: location.to_string(),
                source: format!("{key} has no version").into(),
            });
        }
        for version in versions {
            client
                .delete_object()
                .bucket(&self.settings.bucket)
                .key(&key)
                .version_id(&version)
                .send()
                .await
                .map_err(|error| {
                    let message = describe(&format!("deleting version {version} of"), &key, &error);
                    match error.raw_response().map(|r| r.status().as_u16()) {
                        // What S3 answers for a version under retention or a legal hold.
                        Some(403) => object_store::Error::PermissionDenied {
                            path: location.to_string(),
                            source: message.into(),
                        },
                        _ => generic(message),
                    }
                })?;
        }
        Ok(())
    }
    /// The lock S3 keeps on the current version of `location` (HeadObject: some S3 implementations do not
    /// serve GetObjectRetention).
    pub async fn lock_of(&self, location: &Path) -> object_store::Result<LockStatus> {
        let client = self.client().await;
        let key = self.key(location);
        let head = client
            .head_object()
            .bucket(&self.settings.bucket)
            .key(&key)
            .send()
            .await
            .map_err(
                |error| match error.raw_response().map(|r| r.status().as_u16()) {
                    Some(404) => object_store::Error::NotFound {
                        path: location.to_string(),
                        source: describe("reading the lock of", &key, &error).into(),
                    },
                    _ => generic(describe("reading the lock of", &key, &error)),
                },
            )?;
        Ok(LockStatus {
            mode: head
                .object_lock_mode()
                .map(|mode| mode.as_str().to_string()),
            retain_until_micros: head
                .object_lock_retain_until_date()
                .and_then(|date| date.to_millis().ok())
                .map(|millis| millis.saturating_mul(1000)),
            legal_hold: head.object_lock_legal_hold_status()
                == Some(&ObjectLockLegalHoldStatus::On),
        })
    }

    /// The retention mode this store writes with.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Moves the retention date of the current version of `location` to `until_micros` (in the configured
    /// mode). S3 accepts only a later date (a governance-mode lock could be shortened with a bypass
    /// permission, which chatvault never asks for).
    pub async fn extend_retention(
        &self,
        location: &Path,
        until_micros: i64,
    ) -> object_store::Result<()> {
        let mode = match self.mode {
            LockMode::Compliance => ObjectLockRetentionMode::Compliance,
            LockMode::Governance => ObjectLockRetentionMode::Governance,
            LockMode::Off => return Ok(()),
        };
        let client = self.client().await;
        let key = self.key(location);
        client
            .put_object_retention()
            .bucket(&self.settings.bucket)
            .key(&key)
            .retention(
                aws_sdk_s3::types::ObjectLockRetention::builder()
                    .mode(mode)
                    .retain_until_date(DateTime::from_millis(until_micros / 1000))
                    .build(),
            )
            .send()
            .await
            .map_err(|error| generic(describe("extending the retention of", &key, &error)))?;
        Ok(())
    }

    /// Sets or clears the legal-hold flag of the current version of `location`.
    pub async fn set_legal_hold(&self, location: &Path, on: bool) -> object_store::Result<()> {
        let client = self.client().await;
        let key = self.key(location);
        let status = if on {
            ObjectLockLegalHoldStatus::On
        } else {
            ObjectLockLegalHoldStatus::Off
        };
        client
            .put_object_legal_hold()
            .bucket(&self.settings.bucket)
            .key(&key)
            .legal_hold(
                aws_sdk_s3::types::ObjectLockLegalHold::builder()
                    .status(status)
                    .build(),
            )
            .send()
            .await
            .map_err(|error| generic(describe("setting the legal hold of", &key, &error)))?;
        Ok(())
    }

    /// What the bucket says about Object Lock and versioning.
    pub async fn inspect_bucket(&self) -> BucketReport {
        let client = self.client().await;
        let bucket = &self.settings.bucket;
        let mut report = BucketReport {
            bucket: bucket.clone(),
            ..BucketReport::default()
        };
        match client
            .get_object_lock_configuration()
            .bucket(bucket)
            .send()
            .await
        {
            Ok(output) => {
                let config = output.object_lock_configuration();
                report.object_lock_enabled = config
                    .and_then(|config| config.object_lock_enabled())
                    .is_some_and(|enabled| enabled.as_str() == "Enabled");
                report.default_retention = config
                    .and_then(|config| config.rule())
                    .and_then(|rule| rule.default_retention())
                    .map(|retention| {
                        format!(
                            "{} for {} {}",
                            retention.mode().map(|mode| mode.as_str()).unwrap_or("?"),
                            retention.days().or(retention.years()).unwrap_or(0),
                            if retention.days().is_some() {
                                "days"
                            } else {
                                "years"
                            }
                        )
                    });
            }
            // What S3 answers for a bucket created without Object Lock.
            Err(error)
                if error.as_service_error().and_then(|e| e.code())
                    == Some("ObjectLockConfigurationNotFoundError") =>
            {
                report.object_lock_enabled = false;
            }
            Err(error) => report.errors.push(describe(
                "reading the Object Lock configuration of",
                bucket,
                &error,
            )),
        }
        match client.get_bucket_versioning().bucket(bucket).send().await {
            Ok(output) => {
                report.versioning = output.status().map(|status| status.as_str().to_string())
            }
            // Some S3-compatible servers name the answer's root element differently, which the SDK refuses
            // to parse: the status is read from the body then.
            Err(error) => match versioning_status_of_body(&error) {
                Some(status) => report.versioning = status,
                None => report
                    .errors
                    .push(describe("reading the versioning of", bucket, &error)),
            },
        }
        report
    }
}

/// The `<Status>` of a successful GetBucketVersioning answer the SDK could not parse (`Some(None)`: the
/// answer has no status, versioning was never enabled).
fn versioning_status_of_body<E>(
    error: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Option<Option<String>> {
    let response = error.raw_response()?;
    if response.status().as_u16() != 200 {
        return None;
    }
    let body = std::str::from_utf8(response.body().bytes()?).ok()?;
    if !body.contains("Versioning") {
        return None;
    }
    Some(
        body.split_once("<Status>")
            .and_then(|(_, rest)| rest.split_once("</Status>"))
            .map(|(status, _)| status.trim().to_string()),
    )
}

/// An S3 error as one line: what was done to which key, S3's code and message (AccessDenied on a locked
/// version).
fn describe<E, R>(what: &str, key: &str, error: &aws_sdk_s3::error::SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    match error.as_service_error() {
        Some(service) if service.code().is_some() => format!(
            "{what} {key}: {} ({})",
            service.code().unwrap_or("error"),
            service.message().unwrap_or("no message")
        ),
        _ => format!(
            "{what} {key}: {}",
            aws_sdk_s3::error::DisplayErrorContext(error)
        ),
    }
}

#[async_trait]
impl ObjectStore for LockingS3 {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let client = self.client().await;
        let key = self.key(location);
        let bytes: Bytes = payload.into();
        let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&bytes));
        let mut put = client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(&key)
            .content_md5(md5)
            .body(ByteStream::from(bytes));
        put = match &opts.mode {
            PutMode::Create => put.if_none_match("*"),
            PutMode::Update(version) => match &version.e_tag {
                Some(e_tag) => put.if_match(e_tag),
                None => put,
            },
            PutMode::Overwrite => put,
        };
        if let Some(lock) = opts.extensions.get::<ObjectLock>() {
            let mode = match self.mode {
                LockMode::Compliance => Some(ObjectLockMode::Compliance),
                LockMode::Governance => Some(ObjectLockMode::Governance),
                LockMode::Off => None,
            };
            if let (Some(mode), Some(until)) = (mode, lock.retain_until_micros) {
                put = put
                    .object_lock_mode(mode)
                    .object_lock_retain_until_date(DateTime::from_millis(until / 1000));
            }
            if lock.legal_hold {
                put = put.object_lock_legal_hold_status(ObjectLockLegalHoldStatus::On);
            }
        }
        match put.send().await {
            Ok(output) => Ok(PutResult {
                e_tag: output.e_tag().map(str::to_string),
                version: output.version_id().map(str::to_string),
                extensions: Default::default(),
            }),
            Err(error) => {
                let status = error
                    .raw_response()
                    .map(|response| response.status().as_u16());
                let message = describe("writing", &key, &error);
                Err(match (status, &opts.mode) {
                    (Some(412), PutMode::Create) => object_store::Error::AlreadyExists {
                        path: location.to_string(),
                        source: message.into(),
                    },
                    (Some(412), _) => object_store::Error::Precondition {
                        path: location.to_string(),
                        source: message.into(),
                    },
                    _ => generic(message),
                })
            }
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        if opts.extensions.get::<ObjectLock>().is_some() {
            return Err(object_store::Error::NotImplemented {
                operation: "a multipart upload with an Object Lock".into(),
                implementer: "LockingS3".into(),
            });
        }
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let this = Arc::new(self.clone());
        locations
            .then(move |location| {
                let this = this.clone();
                async move {
                    let location = location?;
                    this.delete_versions(&location).await?;
                    Ok(location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
