//! Credentials, region and endpoint the way AWS tools find them: environment variables
//! first, then a profile of the shared credentials and config files
//! (`~/.aws/credentials`, `~/.aws/config`; `AWS_PROFILE`, default `default`).

use std::collections::HashMap;
use std::path::PathBuf;

use super::StorageSpec;

/// A static key pair (and session token). `Debug` never shows the secret.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"***")
            .field("session_token", &self.session_token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// What the environment and the profile say.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// None: unsigned requests (`storage.anonymous`).
    pub credentials: Option<Credentials>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn home_file(var: &str, default: &str) -> Option<PathBuf> {
    env(var)
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(default)))
}

/// `[section]` → key → value of an INI file as the AWS files write it.
fn read_ini(path: &PathBuf) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return out;
    };
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            out.entry(section.clone())
                .or_default()
                .insert(key.trim().to_lowercase(), value.trim().to_string());
        }
    }
    out
}

/// The profile setting through which a profile's credentials come from somewhere
/// trustflow does not go (role assumption, a credential process, SSO), if any.
fn delegated_by(from_profile: &dyn Fn(&str) -> Option<String>) -> Option<&'static str> {
    [
        "role_arn",
        "source_profile",
        "credential_process",
        "sso_session",
        "sso_start_url",
    ]
    .into_iter()
    .find(|key| from_profile(key).is_some())
}

/// Resolve credentials, region and endpoint; the error says what to set (and never
/// holds a secret).
pub(crate) fn resolve(spec: &StorageSpec) -> Result<Found, String> {
    let profile_named = env("AWS_PROFILE");
    let profile = profile_named.clone().unwrap_or_else(|| "default".into());
    let credentials_file = home_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
    let config_file = home_file("AWS_CONFIG_FILE", ".aws/config");
    let creds_ini = credentials_file.as_ref().map(read_ini).unwrap_or_default();
    let config_ini = config_file.as_ref().map(read_ini).unwrap_or_default();
    let config_section = match profile.as_str() {
        "default" => config_ini.get("default"),
        name => config_ini
            .get(&format!("profile {name}"))
            .or_else(|| config_ini.get(name)),
    };
    let creds_section = creds_ini.get(&profile);
    if let Some(name) = &profile_named
        && creds_section.is_none()
        && config_section.is_none()
    {
        return Err(format!(
            "AWS_PROFILE is `{name}`, but neither {} nor {} has that profile",
            credentials_file.map_or("~/.aws/credentials".into(), |p| p.display().to_string()),
            config_file.map_or("~/.aws/config".into(), |p| p.display().to_string()),
        ));
    }
    let from_profile = |key: &str| {
        creds_section
            .and_then(|s| s.get(key))
            .or_else(|| config_section.and_then(|s| s.get(key)))
            .cloned()
    };
    let region = env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| from_profile("region"));
    let endpoint = env("AWS_ENDPOINT_URL_S3")
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| from_profile("endpoint_url"));
    if spec.anonymous {
        return Ok(Found {
            credentials: None,
            region,
            endpoint,
        });
    }
    let credentials = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(access_key_id), Some(secret_access_key)) => Credentials {
            access_key_id,
            secret_access_key,
            session_token: env("AWS_SESSION_TOKEN"),
        },
        (Some(_), None) => {
            return Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into());
        }
        (None, Some(_)) => {
            return Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into());
        }
        (None, None) => match (
            from_profile("aws_access_key_id"),
            from_profile("aws_secret_access_key"),
        ) {
            (Some(access_key_id), Some(secret_access_key)) => Credentials {
                access_key_id,
                secret_access_key,
                session_token: from_profile("aws_session_token"),
            },
            _ if let Some(key) = delegated_by(&from_profile) => {
                return Err(format!(
                    "profile `{profile}` gets its credentials through `{key}` (role \
                     assumption, a credential process or SSO), which trustflow does not do; \
                     export temporary credentials instead, e.g. `eval \"$(aws configure \
                     export-credentials --profile {profile} --format env)\"`, which sets \
                     AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN"
                ));
            }
            _ => {
                return Err(format!(
                    "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
                     AWS_PROFILE to a profile with aws_access_key_id and \
                     aws_secret_access_key (profile `{profile}` has none), or set \
                     storage.anonymous: true for a public bucket"
                ));
            }
        },
    };
    Ok(Found {
        credentials: Some(credentials),
        region,
        endpoint,
    })
}
