//! Routing of OpenAI-compatible requests by the `model` field of their JSON body.
//!
//! On the `[openai]` hosts, POSTs to `/v1/chat/completions`, `/v1/completions` and
//! `/v1/embeddings` go to the service whose `models` list names the request's model, and
//! `GET /v1/models` lists every configured model. Only a bounded prefix of the body is
//! read to find the field; the bytes read are replayed to the instance, so the body
//! arrives intact.

use serde_json::{json, Value};

/// POST paths routed by model.
const MODEL_ROUTED_PATHS: &[&str] = &["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

/// Returns true for the POST endpoints that carry a `model` field.
pub fn is_model_routed(method: &http::Method, path: &str) -> bool {
    method == http::Method::POST && MODEL_ROUTED_PATHS.contains(&path.trim_end_matches('/'))
}

/// Returns true for `GET /v1/models`.
pub fn is_model_list(method: &http::Method, path: &str) -> bool {
    method == http::Method::GET && path.trim_end_matches('/') == "/v1/models"
}

/// What a scan of a body prefix found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelScan {
    /// The top-level `model` string.
    Found(String),
    /// The prefix ends before the field was found; read more.
    NeedMore,
    /// The body is complete (or not a JSON object) and has no top-level string `model`.
    Missing,
}

/// Looks for the top-level `"model": "..."` member in a prefix of a JSON object. Nested
/// objects are skipped, so a `model` inside `messages` does not count.
pub fn find_model(prefix: &[u8], complete: bool) -> ModelScan {
    let mut scanner = Scanner { bytes: prefix, at: 0 };
    match scanner.top_level_model() {
        Scan::Found(model) => ModelScan::Found(model),
        Scan::Eof if !complete => ModelScan::NeedMore,
        Scan::Eof | Scan::Absent | Scan::Invalid => ModelScan::Missing,
    }
}

enum Scan {
    Found(String),
    Absent,
    Eof,
    Invalid,
}

struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Scanner<'_> {
    fn skip_whitespace(&mut self) {
        while self.at < self.bytes.len() && matches!(self.bytes[self.at], b' ' | b'\t' | b'\n' | b'\r') {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.bytes.get(self.at).copied()
    }

    fn top_level_model(&mut self) -> Scan {
        match self.peek() {
            None => return Scan::Eof,
            Some(b'{') => self.at += 1,
            Some(_) => return Scan::Invalid,
        }
        loop {
            match self.peek() {
                None => return Scan::Eof,
                Some(b'}') => return Scan::Absent,
                Some(b'"') => {}
                Some(_) => return Scan::Invalid,
            }
            let key = match self.string() {
                Ok(key) => key,
                Err(scan) => return scan,
            };
            match self.peek() {
                None => return Scan::Eof,
                Some(b':') => self.at += 1,
                Some(_) => return Scan::Invalid,
            }
            if key == "model" && self.peek() == Some(b'"') {
                return match self.string() {
                    Ok(model) => Scan::Found(model),
                    Err(scan) => scan,
                };
            }
            if let Err(scan) = self.skip_value() {
                return scan;
            }
            match self.peek() {
                None => return Scan::Eof,
                Some(b',') => self.at += 1,
                Some(b'}') => return Scan::Absent,
                Some(_) => return Scan::Invalid,
            }
        }
    }

    /// Reads a JSON string starting at its opening quote, decoding escapes.
    fn string(&mut self) -> Result<String, Scan> {
        let start = self.at;
        self.at += 1;
        let mut escaped = false;
        while let Some(&byte) = self.bytes.get(self.at) {
            self.at += 1;
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    return serde_json::from_slice::<String>(&self.bytes[start..self.at]).map_err(|_| Scan::Invalid);
                }
                _ => {}
            }
        }
        Err(Scan::Eof)
    }

    /// Skips one JSON value of any kind.
    fn skip_value(&mut self) -> Result<(), Scan> {
        match self.peek() {
            None => Err(Scan::Eof),
            Some(b'"') => self.string().map(|_| ()),
            Some(b'{') | Some(b'[') => self.skip_container(),
            Some(_) => {
                // A number, true, false or null: up to the next delimiter.
                while let Some(&byte) = self.bytes.get(self.at) {
                    if matches!(byte, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        return Ok(());
                    }
                    self.at += 1;
                }
                Err(Scan::Eof)
            }
        }
    }

    fn skip_container(&mut self) -> Result<(), Scan> {
        let mut depth = 0usize;
        while let Some(&byte) = self.bytes.get(self.at) {
            match byte {
                b'"' => {
                    self.string()?;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        self.at += 1;
                        return Ok(());
                    }
                }
                _ => {}
            }
            self.at += 1;
        }
        Err(Scan::Eof)
    }
}

/// The body of `GET /v1/models`: every configured model, in the OpenAI list format.
pub fn model_list(models: &[(String, String)]) -> Value {
    let data: Vec<Value> = models
        .iter()
        .map(|(model, service)| json!({ "id": model, "object": "model", "created": 0, "owned_by": service }))
        .collect();
    json!({ "object": "list", "data": data })
}

/// An error body in the OpenAI format.
pub fn error_body(message: &str, error_type: &str, code: &str, param: Option<&str>) -> Value {
    json!({ "error": { "message": message, "type": error_type, "param": param, "code": code } })
}

/// Returns the 400 status and error body for a body without a top-level string `model`.
pub fn missing_model() -> (u16, Value) {
    let message = "the request body has no top-level string field \"model\"";
    (400, error_body(message, "invalid_request_error", "missing_model", Some("model")))
}

/// Returns the 400 status and error body for a body whose first `limit` bytes do not
/// contain `model`. `scope` names the requests the limit applies to, or is empty.
pub fn model_not_in_prefix(limit: usize, scope: &str) -> (u16, Value) {
    let message = format!("the \"model\" field was not found in the first {limit} bytes of the body{scope}; put it earlier");
    (400, error_body(&message, "invalid_request_error", "model_not_found_in_prefix", Some("model")))
}

/// Returns the 404 status and error body for a model that no service serves, in the
/// wording of OpenAI's API.
pub fn unknown_model(model: &str) -> (u16, Value) {
    let message = format!("The model `{model}` does not exist or you do not have access to it.");
    (404, error_body(&message, "invalid_request_error", "model_not_found", Some("model")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_found_at_top_level_only() {
        let body = br#"{"messages":[{"role":"user","content":"x","model":"inner"}],"stream":true,"model":"llama-3"}"#;
        assert_eq!(find_model(body, true), ModelScan::Found("llama-3".into()));
        let first = br#"{ "model" : "m\u00e9" , "messages": []}"#;
        assert_eq!(find_model(first, true), ModelScan::Found("mé".into()));
    }

    #[test]
    fn prefix_without_model_needs_more() {
        let body = br#"{"messages":[{"role":"user","content":"a long prompt"#;
        assert_eq!(find_model(body, false), ModelScan::NeedMore);
        assert_eq!(find_model(body, true), ModelScan::Missing);
        assert_eq!(find_model(br#"{"mod"#, false), ModelScan::NeedMore);
    }

    #[test]
    fn strings_with_braces_and_quotes_are_skipped() {
        let body = br#"{"prompt":"}{\"model\":\"fake\"}","n":2,"x":null,"model":"real"}"#;
        assert_eq!(find_model(body, true), ModelScan::Found("real".into()));
    }

    #[test]
    fn missing_or_invalid_model() {
        assert_eq!(find_model(br#"{"messages":[]}"#, true), ModelScan::Missing);
        assert_eq!(find_model(br#"{"model":42}"#, true), ModelScan::Missing);
        assert_eq!(find_model(br#"[1,2]"#, true), ModelScan::Missing);
        assert_eq!(find_model(b"not json", true), ModelScan::Missing);
    }

    #[test]
    fn routed_paths() {
        assert!(is_model_routed(&http::Method::POST, "/v1/chat/completions"));
        assert!(is_model_routed(&http::Method::POST, "/v1/embeddings/"));
        assert!(!is_model_routed(&http::Method::GET, "/v1/chat/completions"));
        assert!(!is_model_routed(&http::Method::POST, "/v1/models"));
        assert!(is_model_list(&http::Method::GET, "/v1/models"));
    }
}
