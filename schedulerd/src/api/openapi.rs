//! The OpenAPI 3.1 document of the HTTP API, `GET /v1/openapi.json`, built
//! from the handlers' own `#[utoipa::path]` attributes and the body types
//! of `jobcluster_proto::http`, so it cannot drift from what they take and
//! answer. Every route of `router()` is listed in [`ApiDoc`]; an
//! integration test (clusterctl/tests/it/openapi.rs) compares the two.

use std::sync::OnceLock;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use jobcluster_proto::http::ErrorBody;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, RefOr, ResponseBuilder};

use super::ApiError;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "jobcluster scheduler HTTP API",
        version = "1",
        description = "The scheduler's HTTPS API (SPEC §6): the original routes (`/start`, `/stop`, \
`/query`, `/stream`) and `/v1`. Every error answers `{\"error\", \"code\"}` (ErrorBody) with the \
status that fits; `code` is a stable snake_case name. Every route needs credentials: a client \
certificate of the cluster CA, or `Authorization: Bearer <token>` of `[auth] tokens` (a viewer \
token may only read: GETs, `/query` and `/stream`). A scheduler in insecure mode takes requests \
without credentials. Unknown routes answer 404 `not_found`, a wrong method 405 \
`method_not_allowed`.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        super::legacy::start,
        super::legacy::stop,
        super::legacy::query,
        super::legacy::stream,
        super::workers::list,
        super::workers::show,
        super::workers::remove,
        super::workers::drain,
        super::workers::undrain,
        super::jobs::create,
        super::jobs::list,
        super::jobs::show,
        super::jobs::stop,
        super::jobs::logs,
        super::groups::create,
        super::groups::list,
        super::groups::show,
        super::groups::stop,
        super::groups::logs,
        openapi_json,
        // Every route of router() is listed here, with a #[utoipa::path]
        // on its handler (the integration test fails otherwise); /healthz
        // and /readyz take no credentials: `security(())` on their path
        // attribute.
        crate::metrics::scrape,
        super::health::alive,
        super::health::ready,
    ),
    modifiers(&Common),
    security(("bearer" = []), ("client_certificate" = [])),
    tags(
        (name = "original", description = "The original design's routes: every request names its worker."),
        (name = "jobs", description = "Jobs: start (placed or on a named worker, queued when no slot is free), list, show, stop, output."),
        (name = "groups", description = "Fan-out: one job per matching worker under one group id."),
        (name = "workers", description = "The workers the scheduler knows."),
        (name = "meta", description = "This document."),
    ),
)]
pub(crate) struct ApiDoc;

/// What every route shares: the credentials it takes, and the answers
/// the layers around every handler can give (authentication, and the
/// bounds on request bodies, which apply whatever the route).
struct Common;

impl utoipa::Modify for Common {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token of `[auth] tokens`; role `viewer` may only read, `admin` may do anything.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "client_certificate",
            SecurityScheme::MutualTls {
                description: Some(
                    "A certificate of the cluster CA with the role `client` (`clusterctl pki issue`)."
                        .to_owned(),
                ),
                extensions: None,
            },
        );
        let common = [
            (
                "401",
                "`unauthenticated`: no credentials, a malformed Authorization header, or an unknown token.",
            ),
            (
                "403",
                "`forbidden`: a certificate without the client role, or a viewer token on a route that changes something.",
            ),
            (
                "405",
                "`method_not_allowed`: a path parameter left empty makes the path another route's (`/v1/workers//drain` is `/v1/workers/{id}`), which does not take this method.",
            ),
            (
                "408",
                "`body_timeout`: the request body did not arrive within 30 s of its headers; the connection is closed.",
            ),
            (
                "413",
                "`payload_too_large`: the request body is over 1 MiB.",
            ),
            (
                "504",
                "`request_timeout`: no answer within the request deadline (70 s by default; a streamed body is never cut by it).",
            ),
        ];
        for item in doc.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.delete,
                &mut item.put,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                // The probes sit outside authentication, body limits and
                // the request deadline: none of these answers applies.
                let public = operation.security.as_ref().is_some_and(|s| {
                    s.iter()
                        .all(|r| r == &utoipa::openapi::security::SecurityRequirement::default())
                });
                if public {
                    continue;
                }
                for (status, description) in common {
                    // A route's own description of the status (naming more
                    // codes) stays.
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| RefOr::T(error_response(description)));
                }
            }
        }
    }
}

fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "ErrorBody",
                ))))
                .build(),
        )
        .build()
}

/// The document, serialized once.
fn document() -> Result<&'static str, ApiError> {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    if let Some(text) = DOCUMENT.get() {
        return Ok(text);
    }
    let text = ApiDoc::openapi().to_json().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the OpenAPI document could not be serialized: {e}"),
        )
    })?;
    Ok(DOCUMENT.get_or_init(|| text))
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    operation_id = "openapi",
    tag = "meta",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API (this document).", content_type = "application/json", body = Object),
        (status = 500, description = "`internal`: the document could not be serialized (a bug).", body = ErrorBody),
    ),
)]
pub(crate) async fn openapi_json() -> Result<Response, ApiError> {
    let text = document()?;
    Ok(([(header::CONTENT_TYPE, "application/json")], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_and_every_operation_lists_its_errors() {
        let text = document().unwrap_or_default();
        let doc: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        assert!(paths.len() >= 16, "{paths:?}");
        let mut ids = std::collections::HashSet::new();
        for (path, item) in &paths {
            for (method, op) in item.as_object().into_iter().flatten() {
                let id = op["operationId"].as_str().unwrap_or_default().to_owned();
                assert!(ids.insert(id.clone()), "operationId {id} twice");
                let responses = op["responses"].as_object().cloned().unwrap_or_default();
                let public = ["/healthz", "/readyz"].contains(&path.as_str());
                for status in ["401", "403", "408", "413", "504"] {
                    assert_eq!(
                        responses.contains_key(status),
                        !public,
                        "{method} {path}: {status}"
                    );
                }
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{method} {path}: no success"
                );
            }
        }
    }
}
