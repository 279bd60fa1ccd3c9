//! The OpenAPI document, generated from the handlers' annotations so it cannot drift from them.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{collections, conflicts, dead_letters, health, records, regions, repair, resolvers};

struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer =
            || SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build());
        components.add_security_scheme("admin", bearer());
        components.add_security_scheme("api", bearer());
        components.add_security_scheme("peer", bearer());
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "locus", description = "A multi-leader geo-replicated JSON record store: the REST API of one region."),
    paths(
        records::get, records::put, records::delete, records::list, records::rehome,
        collections::configure, collections::show, collections::list, collections::delete,
        resolvers::upload, resolvers::list, resolvers::show, resolvers::remove, resolvers::dry_run,
        conflicts::list, dead_letters::list, dead_letters::retry, dead_letters::discard, regions::list, regions::retire, repair::repair_now,
        regions::announce, repair::actor_seen, repair::applied, repair::collections, repair::modules, repair::module, repair::digests, repair::hashes, repair::states, repair::states_after, repair::states_by_hash,
        health::healthz, health::readyz, health::metrics,
    ),
    modifiers(&BearerSchemes),
)]
pub struct ApiDoc;

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
