//! Request and response bodies of the HTTP API (serde + OpenAPI schemas).

pub mod generate;
pub mod neutral_only;
pub mod openai;

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::marker::PhantomData;

/// `T` read from a JSON object only: serde's derive also takes an array of the
/// fields in order, which the OpenAPI description does not allow.
#[derive(Debug, Clone, PartialEq)]
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        deserializer.deserialize_map(ObjectVisitor(PhantomData)).map(Object)
    }
}

/// For `#[serde(deserialize_with)]` on struct-typed fields.
pub fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<T, D::Error> {
    Object::deserialize(deserializer).map(|o| o.0)
}

pub fn optional_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    Option::<Object<T>>::deserialize(deserializer).map(|o| o.map(|o| o.0))
}

pub fn objects<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Vec<T>, D::Error> {
    Vec::<Object<T>>::deserialize(deserializer).map(|v| v.into_iter().map(|o| o.0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::generate::GenerateRequest;
    use crate::api::openai::ChatCompletionRequest;
    use serde_json::json;

    #[test]
    fn objects_only() {
        let parse = |v| serde_json::from_value::<Object<GenerateRequest>>(v);
        assert!(parse(json!({"inputs": "hi", "parameters": {"seed": 1}})).is_ok());
        assert!(parse(json!(["hi"])).is_err());
        assert!(parse(json!({"inputs": "hi", "parameters": [null, null]})).is_err());
        let chat = |v| serde_json::from_value::<ChatCompletionRequest>(v);
        assert!(chat(json!({"messages": [["user", "hi"]]})).is_err());
        assert!(chat(json!({"messages": [{"role": "user", "content": "hi"}], "stream_options": [true]})).is_err());
        assert!(chat(json!({"messages": [{"role": "user", "content": "hi"}], "stream_options": null})).is_ok());
    }
}
