//! Fields of TGI's or OpenAI's API that we do not implement but that official clients
//! send anyway with a value that asks for nothing (`text-generation`'s `grammar: null`,
//! `tools: null`, ...). They are accepted with such a value only; any other value is a
//! 422, so that a request is never answered as if we had honoured it.

use crate::validation::ValidationError;
use serde_json::Value;

/// One such field of a request, as sent (`None`: absent).
pub struct NeutralOnly<'a> {
    pub name: &'static str,
    pub value: Option<&'a Value>,
    /// The field's own "nothing" besides null and empty values (`best_of: 1`, ...).
    pub neutral: Option<Value>,
}

impl<'a> NeutralOnly<'a> {
    /// A field whose only neutral values are null and empty ones (`""`, `[]`, `{}`).
    pub fn empty(name: &'static str, value: &'a Option<Value>) -> Self {
        Self { name, value: value.as_ref(), neutral: None }
    }

    /// A field that also has a neutral value of its own (OpenAI's `best_of: 1`, ...).
    pub fn empty_or(name: &'static str, value: &'a Option<Value>, neutral: Value) -> Self {
        Self { name, value: value.as_ref(), neutral: Some(neutral) }
    }

    fn is_neutral(&self) -> bool {
        let Some(value) = self.value else { return true };
        let empty = match value {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::Bool(_) | Value::Number(_) => false,
        };
        empty || self.neutral.as_ref() == Some(value)
    }
}

/// The first field that asks for something, as an error naming it.
pub fn check<'a>(fields: impl IntoIterator<Item = NeutralOnly<'a>>) -> Result<(), ValidationError> {
    match fields.into_iter().find(|field| !field.is_neutral()) {
        Some(field) => Err(ValidationError::Unsupported(field.name)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn null_empty_and_the_fields_own_neutral_value_pass_anything_else_is_named() {
        for value in [None, Some(json!(null)), Some(json!("")), Some(json!([])), Some(json!({})), Some(json!(1))] {
            assert_eq!(check([NeutralOnly::empty_or("best_of", &value, json!(1))]), Ok(()), "{value:?}");
        }
        for value in [json!(2), json!(false), json!(0), json!("x"), json!([1]), json!({"a": 1})] {
            let field = Some(value);
            assert_eq!(
                check([NeutralOnly::empty("a", &None), NeutralOnly::empty_or("best_of", &field, json!(1))]),
                Err(ValidationError::Unsupported("best_of")),
                "{field:?}"
            );
        }
    }
}
