//! The configuration file as the `chatvault` binary reads it: the settings every role shares
//! ([`SharedConfig`], at the top level of the file) and each service's section, defined next to its service.
//! `config/chatvault.example.toml`, next to this crate, is the reference file; the tests below hold it to the
//! `Default` values, which are the one source of defaults.
//!
//! A role that runs on its own needs only the shared settings and its section; the binary reads the whole
//! file so that every role of a deployment can share one file and a misspelt key is an error in every role.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use chatvault_archiver::config::ArchiverConfig;
use chatvault_core::config::{ConfigSource, Section, SharedConfig};
use chatvault_core::error::Result;
use chatvault_ingest_gateway::config::GatewayConfig;
use chatvault_restorer::config::RestorerConfig;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Config {
    /// `kafka`, `storage`, `keys`, `telemetry` and `tenants`, at the top level of the file.
    #[serde(flatten)]
    pub shared: SharedConfig,
    pub gateway: GatewayConfig,
    pub archiver: ArchiverConfig,
    pub restorer: RestorerConfig,
    /// Warnings about old setting names found while loading; roles log them once their logging is up. Not a
    /// setting.
    #[serde(skip)]
    pub deprecated_settings: Vec<String>,
}

impl Config {
    /// Loads `path` (when given), applies the process environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        Self::from_source(ConfigSource::load(path)?)
    }

    /// Parses TOML text, applies overrides from `env` (a map, so tests can inject it), and validates.
    pub fn from_toml_and_env(text: &str, env: &HashMap<String, String>) -> Result<Config> {
        Self::from_source(ConfigSource::from_toml_and_env(text, env)?)
    }

    /// The checks loading makes, for a configuration built in code.
    pub fn validate(&self) -> Result<()> {
        self.shared.validate()?;
        self.gateway.validate()?;
        self.archiver.validate()?;
        self.restorer.validate()
    }

    fn from_source(mut source: ConfigSource) -> Result<Config> {
        let shared = source.shared()?;
        let gateway = source.section()?;
        let archiver = source.section()?;
        let restorer = source.section()?;
        let deprecated_settings = source.finish()?;
        Ok(Config {
            shared,
            gateway,
            archiver,
            restorer,
            deprecated_settings,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::time::Duration;

    use super::*;
    use chatvault_ingest_gateway::config::WebhookPlatform;

    #[test]
    fn environment_overrides_the_file() {
        let text = r#"
            [kafka]
            brokers = "file-broker:9092"
            [archiver]
            max_batch_events = 10
        "#;
        let env = HashMap::from([
            (
                "CHATVAULT__KAFKA__BROKERS".to_string(),
                "env-broker:9092".to_string(),
            ),
            (
                "CHATVAULT__ARCHIVER__MAX_BATCH_AGE_MS".to_string(),
                "2500".to_string(),
            ),
            (
                "CHATVAULT__STORAGE__OPTIONS__AWS_ALLOW_HTTP".to_string(),
                "true".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ]);
        let config = Config::from_toml_and_env(text, &env).expect("valid");
        assert_eq!(config.shared.kafka.brokers, "env-broker:9092");
        assert_eq!(config.archiver.max_batch_events, 10);
        assert_eq!(config.archiver.max_batch_age, Duration::from_millis(2500));
        assert_eq!(
            config.deprecated_settings,
            vec![
                "archiver.max_batch_age_ms is deprecated and will be removed in the next release: write \
                 archiver.max_batch_age = \"2500ms\" (or CHATVAULT__ARCHIVER__MAX_BATCH_AGE=2500ms)"
                    .to_string()
            ],
            "the old name still works, with a warning"
        );
        assert_eq!(config.shared.storage.options["aws_allow_http"], "true");
    }

    #[test]
    fn errors_name_the_setting() {
        let cases = [
            ("[kafka]\nbrokerz = \"x\"", "unknown field `brokerz`"),
            (
                "[gateway]\nmax_batch_events = 0",
                "gateway.max_batch_events",
            ),
            ("[archivers]\nzstd_level = 3", "unknown section `archivers`"),
            ("[archiver]\nzstd_level = 0", "archiver.zstd_level"),
            (
                "[archiver]\nupload_concurrency = 0",
                "archiver.upload_concurrency",
            ),
            (
                "[archiver]\nstall_timeout = \"0s\"",
                "archiver.stall_timeout",
            ),
            (
                "[archiver]\nmax_batch_age = 500",
                "expected a duration with a unit, such as \"500ms\"",
            ),
            (
                "[archiver]\nmax_batch_age_ms = 500\nmax_batch_age = \"1s\"",
                "archiver.max_batch_age_ms: is the old name of archiver.max_batch_age; set only one",
            ),
            (
                "[restorer]\nmax_concurrent_requests = 0",
                "restorer.max_concurrent_requests",
            ),
            (
                "[restorer]\nmax_buffered_bytes = 1024",
                "restorer.max_buffered_bytes: must be at least 64 KiB",
            ),
            (
                "[[gateway.webhooks]]\nname = \"t\"\nplatform = \"teams\"\ntenant = \"acme\"\nsecrets = [\"s\"]\napp_id = \"a\"\njwks_file = \"/k\"\n[[gateway.webhooks.certificates]]\nid = \"c\"\nprivate_key_file = \"/a\"\n[[gateway.webhooks.certificates]]\nid = \"c\"\nprivate_key_file = \"/b\"",
                "gateway.webhooks[0].certificates[1].id",
            ),
            (
                "[[gateway.webhooks]]\nname = \"t\"\nplatform = \"teams\"\ntenant = \"acme\"\nsecrets = [\"s\"]\njwks_file = \"/k\"\n[[gateway.webhooks.certificates]]\nid = \"c\"\nprivate_key_file = \"/a\"",
                "gateway.webhooks[0].app_id",
            ),
            (
                "[[gateway.webhooks]]\nname = \"s\"\nplatform = \"slack\"\ntenant = \"acme\"\nsecrets = [\"s\"]\napp_id = \"a\"",
                "gateway.webhooks[0].app_id: is only for platform teams",
            ),
            (
                "[[gateway.webhooks]]\nname = \"t\"\nplatform = \"teams\"\ntenant = \"acme\"\nsecrets = [\"s\"]\ncertificate = []",
                "unknown field `certificate`",
            ),
        ];
        for (text, expected) in cases {
            let error = Config::from_toml_and_env(text, &HashMap::new()).expect_err(expected);
            assert!(
                error.message().contains(expected),
                "{expected}: {}",
                error.message()
            );
        }
    }

    #[test]
    fn example_file_is_valid() {
        let text = include_str!("../chatvault.example.toml");
        let config = Config::from_toml_and_env(text, &HashMap::new()).expect("example is valid");
        assert_eq!(config.shared.tenants[0].tokens.len(), 2);
        // The example's token_file is not mounted here; the error names the token and the file.
        let error = config.shared.authenticator().expect_err("file missing");
        assert!(error.message().contains("acme-legal") && error.message().contains("token_file"));
    }

    /// Every leaf setting of `table` as `(dotted path, value)`; arrays of tables (tenants, webhooks) left out.
    fn leaf_settings(table: &toml::Table, prefix: &str, out: &mut BTreeMap<String, toml::Value>) {
        for (key, value) in table {
            let path = format!("{prefix}{key}");
            match value {
                toml::Value::Table(inner) => leaf_settings(inner, &format!("{path}."), out),
                toml::Value::Array(items) if items.iter().any(toml::Value::is_table) => {}
                toml::Value::Array(items) if items.is_empty() => {}
                other => {
                    out.insert(path, other.clone());
                }
            }
        }
    }

    /// The defaults have one source, the `Default` impls. The example file, which documents every setting
    /// with its default, must state exactly those values.
    #[test]
    fn the_example_file_states_the_defaults() {
        let example: toml::Table =
            toml::from_str(include_str!("../chatvault.example.toml")).expect("TOML");
        let defaults = toml::Table::try_from(Config::default()).expect("serializable");
        let (mut stated, mut default) = (BTreeMap::new(), BTreeMap::new());
        leaf_settings(&example, "", &mut stated);
        leaf_settings(&defaults, "", &mut default);
        let mut differences = Vec::new();
        for (path, value) in &default {
            match stated.get(path) {
                Some(stated) if stated == value => {}
                Some(stated) => {
                    differences.push(format!("{path}: example {stated:?}, default {value:?}"))
                }
                None => differences.push(format!(
                    "{path}: default {value:?}, missing from the example"
                )),
            }
        }
        for path in stated.keys().filter(|path| !default.contains_key(*path)) {
            differences.push(format!("{path}: in the example, not a default"));
        }
        assert!(differences.is_empty(), "{differences:#?}");
    }

    /// The chart needs some defaults itself (to check that a pod's grace period covers its role's shutdown);
    /// it must use the binary's.
    #[test]
    fn the_chart_assumes_the_binary_defaults() {
        let helpers = include_str!("../../helm/chatvault/templates/_helpers.tpl");
        let defaults = Config::default();
        let millis = |section: &str, name: &str| -> u128 {
            let table = toml::Table::try_from(&defaults).expect("serializable");
            let text = table[section][name]
                .as_str()
                .expect("a duration")
                .to_string();
            chatvault_core::duration::parse(&text)
                .expect("parses")
                .as_millis()
        };
        let pattern = "include \"chatvault.durationMillis\" (list $v.config.";
        let mut checked = 0;
        for (at, _) in helpers.match_indices(pattern) {
            let rest = &helpers[at + pattern.len()..];
            let call = &rest[..rest.find(')').expect("closed")];
            let parts: Vec<&str> = call.split_whitespace().collect();
            let [section, name, assumed] = parts[..] else {
                panic!("unexpected call {call:?}");
            };
            let name = name.trim_matches('"');
            let assumed: u128 = assumed.parse().expect("millis");
            assert_eq!(
                assumed,
                millis(section, name),
                "{section}.{name} in _helpers.tpl"
            );
            checked += 1;
        }
        assert_eq!(
            checked, 5,
            "the grace-period checks of gateway, restorer and archiver"
        );
        let sequence = millis("gateway", "shutdown_delay")
            + millis("gateway", "drain_timeout")
            + millis("archiver", "shutdown_timeout")
            + millis("archiver", "session_timeout")
            + millis("restorer", "drain_timeout");
        assert!(
            helpers.contains(&format!(
                "\"preStopSleepSeconds\" 0) {sequence} \"the gateway's, archiver's and restorer's default"
            )),
            "the standalone grace check assumes {sequence} ms of shutdown deadlines in sequence"
        );
    }

    /// The example file with its commented-out block starting at `marker` uncommented and appended, loaded.
    fn example_with_commented_block(marker: &str) -> Config {
        let text = include_str!("../chatvault.example.toml");
        let start = text.find(marker).expect(marker);
        let block: String = text[start..]
            .lines()
            .take_while(|line| line.starts_with('#'))
            .map(|line| format!("{}\n", line.trim_start_matches('#').trim_start()))
            .collect();
        Config::from_toml_and_env(&format!("{text}\n{block}"), &HashMap::new())
            .unwrap_or_else(|error| panic!("the example at {marker:?} is invalid: {error}"))
    }

    #[test]
    fn commented_teams_example_is_valid() {
        let config = example_with_commented_block("# [[gateway.webhooks]]");
        let teams = &config.gateway.webhooks[1];
        assert_eq!(teams.platform, Some(WebhookPlatform::Teams));
        assert_eq!(teams.certificates[0].id, "cert-2026");
    }

    #[test]
    fn commented_oidc_example_is_valid() {
        let config = example_with_commented_block("# [[oidc]]");
        let issuer = &config.shared.oidc[0];
        assert_eq!(issuer.audience, "urn:chatvault");
        assert_eq!(issuer.roles[0].tenant, "acme");
        assert_eq!(
            issuer.jwks_min_refresh_interval,
            Duration::from_secs(30),
            "the example states the defaults"
        );
    }
}
