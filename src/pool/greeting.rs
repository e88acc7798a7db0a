//! The pool's cached login greeting (transaction mode): the client parameters and the
//! ParameterStatus bytes a login on the pool's baseline gets.

use std::sync::Arc;

use super::{lock, Pool};
use crate::backend::params::{parameter_status, ClientParams};
use crate::backend::Params;

/// What a login that borrows no server (transaction mode) tells the client and keeps: the
/// client's parameters and the ParameterStatus messages announcing them. It depends only on
/// the pool's baseline and the client's startup parameters, which the clients of one
/// application share, so the pool keeps the latest and the next such login reuses it instead
/// of recomputing (a measurable share of a login's CPU: pgbench -C).
#[derive(Clone)]
pub struct Greeting {
    baseline: Arc<Params>,
    desired: Vec<(String, String)>,
    params: ClientParams,
    status: bytes::Bytes,
}

impl Pool {
    /// The client's parameters and the serialized ParameterStatus messages for a login on the
    /// pool's `baseline` (a server's values), with the client's startup parameters `desired`.
    pub fn greeting(
        &self,
        baseline: &Arc<Params>,
        desired: Vec<(String, String)>,
    ) -> (ClientParams, bytes::Bytes) {
        // Compared in place: cloning the cached greeting first would copy its `desired` list,
        // three allocations per login for nothing.
        if let Some(g) = lock(&self.inner.greeting).as_ref() {
            if Arc::ptr_eq(&g.baseline, baseline) && g.desired == desired {
                return (g.params.clone(), g.status.clone());
            }
        }
        let mut params = ClientParams::initial(Some(baseline), baseline, desired.clone());
        self.intern(&mut params);
        let status = parameter_status(baseline, &params);
        *lock(&self.inner.greeting) = Some(Greeting {
            baseline: baseline.clone(),
            desired,
            params: params.clone(),
            status: status.clone(),
        });
        (params, status)
    }

    /// Share `params`' values with the pool's other clients that have the same ones.
    pub fn intern(&self, params: &mut ClientParams) {
        params.share_with(|v| self.intern_params(v));
    }
}
