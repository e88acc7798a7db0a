//! The HTTP admin endpoint (DESIGN.md section 5): `/livez`, `/readyz`, `/metrics`, `/status`.
//!
//! It runs on its own task outside the drain's tracker and is stopped last, so probes and
//! scrapes keep answering while the process drains.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::shutdown::Phase;
use crate::state::Shared;

/// Serve until `stop` is cancelled.
pub async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = router(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(shared)
}

async fn livez() -> &'static str {
    "ok\n"
}

/// Why the process is not ready, if it is not.
pub fn not_ready_reason(shared: &Shared) -> Option<&'static str> {
    match shared.shutdown.phase() {
        Phase::Starting => Some("starting"),
        Phase::Draining => Some("draining"),
        Phase::Stopped => Some("stopped"),
        Phase::Running => {
            if shared
                .upstream_ok
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                None
            } else {
                Some("upstream unreachable")
            }
        }
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    match not_ready_reason(&shared) {
        None => (StatusCode::OK, Json(json!({"status": "ready"}))).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reason": reason})),
        )
            .into_response(),
    }
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else the classic text format.
async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            shared.metrics.encode(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            shared.metrics.encode_prometheus_text(),
        )
            .into_response()
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let g = &shared.metrics.client_gauges;
    let stats = &shared.shutdown.stats;
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    Json(json!({
        "phase": shared.shutdown.phase(),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "upstream_ok": shared.upstream_ok.load(std::sync::atomic::Ordering::Relaxed),
        "clients": {
            "total": shared.client_count(),
            "active": g.active.get(),
            "idle": g.idle.get(),
            "waiting": g.waiting.get(),
        },
        "pools": shared.pool_statuses(),
        "drain": {
            "kind": shared.shutdown.kind(),
            "clients_left": ld(&stats.clients_left),
            "clients_closed_at_boundary": ld(&stats.clients_closed_at_boundary),
            "clients_forced": ld(&stats.clients_forced),
        },
        "server_connections_leaked": shared.metrics.leaked_total(),
        // `[budget]` only: slots held, in use by server connections, clients waiting for
        // one, and whether the control connection is up (null without a budget).
        "budget": shared.budget.as_ref().map(|b| {
            let s = b.status();
            json!({
                "name": b.settings().name,
                "max_server_connections": b.settings().max,
                "held": s.held,
                "used": s.used,
                "waiting": s.waiting,
                "connected": s.connected,
            })
        }),
    }))
    .into_response()
}
