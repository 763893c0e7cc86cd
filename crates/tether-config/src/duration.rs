//! Durations in configuration: a number of seconds (`30`, as mirrord writes them) or a string with
//! units (`"100ms"`, `"5s"`, `"10m"`).

use std::{borrow::Cow, fmt, time::Duration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    pub const fn from_secs(secs: u64) -> Self {
        ConfigDuration(Duration::from_secs(secs))
    }

    pub const fn from_millis(millis: u64) -> Self {
        ConfigDuration(Duration::from_millis(millis))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ConfigDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration: seconds as a number, or a string like \"500ms\" or \"5s\"")
            }

            fn visit_u64<E: de::Error>(self, secs: u64) -> Result<ConfigDuration, E> {
                Ok(ConfigDuration::from_secs(secs))
            }

            fn visit_i64<E: de::Error>(self, secs: i64) -> Result<ConfigDuration, E> {
                u64::try_from(secs)
                    .map(ConfigDuration::from_secs)
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ConfigDuration, E> {
                humantime::parse_duration(text)
                    .map(ConfigDuration)
                    .map_err(|e| {
                        E::custom(format_args!(
                            "invalid duration {text:?}: {e} (examples: \"500ms\", \"5s\", \"10m\")"
                        ))
                    })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for ConfigDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Seconds as a number, or a string with units such as \"500ms\", \"5s\", \"10m\".",
            "anyOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "format": "duration" }
            ]
        })
    }
}
