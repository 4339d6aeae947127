//! Layered configuration for every Encore process and command.
//!
//! Each process or command has one serde `Config` struct, read from a named
//! section, layered lowest to highest:
//!
//! 1. the struct's `Default`;
//! 2. the `[section]` table of a config file (TOML or JSON, by extension);
//! 3. environment variables `ENCORE_<SECTION>__<KEY>` (for example
//!    `ENCORE_PRETRAIN__STEPS=500`; nested keys join with `__`);
//! 4. command-line flags (fields the user did not pass are left out).
//!
//! Errors name the offending key, e.g. `pretrain.steps`.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Prefix of the environment variables read by [`load`].
pub const ENV_PREFIX: &str = "ENCORE";

/// A configuration could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a value has the wrong type; the message
    /// names the key or the file.
    #[error("configuration: {0}")]
    Invalid(String),
}

impl From<config::ConfigError> for ConfigError {
    fn from(e: config::ConfigError) -> Self {
        ConfigError::Invalid(e.to_string())
    }
}

/// Checks that `value`, the value of `key`, is an http(s) URL such as the
/// coordinator's `http://HOST:PORT`; the error names the key.
pub fn check_url(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{key}: expected http(s)://HOST:PORT, got {value:?}"
        )))
    }
}

/// A secret (a token) given either inline or as a file holding it (a
/// Kubernetes Secret mounted as a volume), surrounding whitespace trimmed.
/// `key` is the inline key's full path (for example
/// `actor.worker_token`); the file key is `key` + `_file`. `None` when
/// neither is set; an error naming the key when both are, or when the file
/// cannot be read.
pub fn secret(
    key: &str,
    inline: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<String>, ConfigError> {
    match (inline, file) {
        (Some(value), None) => Ok(Some(value.trim().to_owned())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|text| Some(text.trim().to_owned()))
            .map_err(|e| ConfigError::Invalid(format!("{key}_file: {}: {e}", path.display()))),
        (Some(_), Some(_)) => Err(ConfigError::Invalid(format!(
            "{key}: set either it or {key}_file, not both"
        ))),
        (None, None) => Ok(None),
    }
}

/// Builds the configuration of `section` from defaults, an optional file,
/// the environment and `flags` (serialised; `None` fields are skipped, so
/// give flag structs `#[serde(skip_serializing_if = "Option::is_none")]`).
pub fn load<T, F>(section: &str, file: Option<&Path>, flags: &F) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
    F: Serialize,
{
    load_with_env(section, file, flags, std::env::vars())
}

/// [`load`] with an explicit environment, so tests need not mutate the
/// process's.
pub fn load_with_env<T, F>(
    section: &str,
    file: Option<&Path>,
    flags: &F,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
    F: Serialize,
{
    let nest = |value: serde_json::Value| serde_json::json!({ section: value });
    let defaults = serde_json::to_value(T::default())
        .map_err(|e| ConfigError::Invalid(format!("{section}: defaults: {e}")))?;
    let flags = serde_json::to_value(flags)
        .map_err(|e| ConfigError::Invalid(format!("{section}: flags: {e}")))?;

    let mut builder =
        config::Config::builder().add_source(config::Config::try_from(&nest(defaults))?);
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::Invalid(format!(
                "{}: no such file",
                path.display()
            )));
        }
        builder = builder.add_source(config::File::from(path).required(true));
    }
    let env: std::collections::HashMap<String, String> = env.into_iter().collect();
    builder = builder
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        )
        .add_source(config::Config::try_from(&nest(flags))?);
    let merged: serde_json::Value = builder.build()?.try_deserialize()?;
    let value = merged
        .get(section)
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    // Deserialising through the path tracker makes errors name `section.key`.
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." {
            section.to_string()
        } else {
            format!("{section}.{path}")
        };
        ConfigError::Invalid(format!("{key}: {}", e.into_inner()))
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        steps: usize,
        name: String,
        rate: f64,
    }

    impl Default for Demo {
        fn default() -> Self {
            Self {
                steps: 10,
                name: "base".into(),
                rate: 0.5,
            }
        }
    }

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        steps: Option<usize>,
    }

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("encore.toml");
        std::fs::write(&file, "[demo]\nsteps = 20\nname = \"from-file\"\n").unwrap();

        let d: Demo = load_with_env("demo", None, &Flags::default(), no_env()).unwrap();
        assert_eq!(d, Demo::default());

        let d: Demo = load_with_env("demo", Some(&file), &Flags::default(), no_env()).unwrap();
        assert_eq!((d.steps, d.name.as_str(), d.rate), (20, "from-file", 0.5));

        let env = vec![("ENCORE_DEMO__STEPS".to_string(), "30".to_string())];
        let d: Demo = load_with_env("demo", Some(&file), &Flags::default(), env.clone()).unwrap();
        assert_eq!(d.steps, 30);

        let d: Demo = load_with_env("demo", Some(&file), &Flags { steps: Some(40) }, env).unwrap();
        assert_eq!((d.steps, d.name.as_str()), (40, "from-file"));
    }

    #[test]
    fn errors_name_the_key() {
        let env = vec![("ENCORE_DEMO__STEPS".to_string(), "many".to_string())];
        let err = load_with_env::<Demo, _>("demo", None, &Flags::default(), env).unwrap_err();
        assert!(err.to_string().contains("steps"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("encore.toml");
        std::fs::write(&file, "[demo]\nstepz = 1\n").unwrap();
        let err =
            load_with_env::<Demo, _>("demo", Some(&file), &Flags::default(), no_env()).unwrap_err();
        assert!(err.to_string().contains("stepz"), "{err}");

        let err = load_with_env::<Demo, _>(
            "demo",
            Some(&dir.path().join("nope.toml")),
            &Flags::default(),
            no_env(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }
}
