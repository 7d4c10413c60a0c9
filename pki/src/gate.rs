//! The gate in front of a daemon's services: before any handler runs, the
//! daemon's rule for the called method decides from the caller alone whether
//! the call may proceed. A refused call never reaches a handler, so it
//! changes nothing. Rules that depend on the object (its project) are the
//! handlers' own, with the same [`Caller`] from the request's extensions.

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::Status;

use crate::identity::Caller;

/// Decides one call: the gRPC method path (`/pdisk.v1.VolumeService/CreateVolume`)
/// and the caller (None when the transport put none: refused).
pub type Check = Arc<dyn Fn(&str, Option<&Caller>) -> Result<(), Status> + Send + Sync>;

/// A tower layer applying `check` to every request.
#[derive(Clone)]
pub struct GateLayer {
    check: Check,
}

impl GateLayer {
    pub fn new(check: Check) -> GateLayer {
        GateLayer { check }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            check: self.check.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    check: Check,
}

impl<S> tower::Service<http::Request<Body>> for Gate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let caller = req.extensions().get::<Caller>();
        match (self.check)(req.uri().path(), caller) {
            Ok(()) => futures::future::Either::Left(self.inner.call(req)),
            Err(status) => {
                futures::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// The caller of a request, as the transport tagged it; handlers behind the
/// gate can rely on it being there.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<&Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .ok_or_else(|| Status::unauthenticated("the connection carries no caller identity"))
}
