//! Errors as the API reports them: a ttrpc status code that tells the host
//! what kind of failure it was, and a message that says what happened.

use capsa_layers::LayerError;
use capsa_runtime::RuntimeError;
use ttrpc::Code;

#[derive(Debug)]
pub struct ApiError {
    code: Code,
    message: String,
}

impl ApiError {
    fn new(code: Code, message: String) -> Self {
        ApiError { code, message }
    }

    pub fn invalid(message: String) -> Self {
        Self::new(Code::INVALID_ARGUMENT, message)
    }

    pub fn not_found(message: String) -> Self {
        Self::new(Code::NOT_FOUND, message)
    }

    pub fn exists(message: String) -> Self {
        Self::new(Code::ALREADY_EXISTS, message)
    }

    pub fn precondition(message: String) -> Self {
        Self::new(Code::FAILED_PRECONDITION, message)
    }

    pub fn exhausted(message: String) -> Self {
        Self::new(Code::RESOURCE_EXHAUSTED, message)
    }

    pub fn internal(message: String) -> Self {
        Self::new(Code::INTERNAL, message)
    }

    pub fn from_layer(error: LayerError) -> Self {
        let code = match error {
            LayerError::UnknownMediaType(_) => Code::INVALID_ARGUMENT,
            LayerError::UnknownParent { .. } | LayerError::UnknownChain(_) => {
                Code::FAILED_PRECONDITION
            }
            LayerError::DigestMismatch { .. }
            | LayerError::SizeMismatch { .. }
            | LayerError::DiffIdMismatch { .. }
            | LayerError::Unpack { .. } => Code::DATA_LOSS,
            LayerError::ChainTooDeep(_) => Code::INVALID_ARGUMENT,
            LayerError::Io { .. } => Code::INTERNAL,
        };
        Self::new(code, error.to_string())
    }

    pub fn from_runtime(error: RuntimeError) -> Self {
        let code = match error {
            RuntimeError::InvalidId(_) | RuntimeError::InvalidSpec(_) => Code::INVALID_ARGUMENT,
            RuntimeError::Exists(_) => Code::ALREADY_EXISTS,
            // A spec the kernel refuses (a mount, a program not found) is
            // the caller's to fix.
            RuntimeError::Setup { .. } => Code::FAILED_PRECONDITION,
            _ => Code::INTERNAL,
        };
        Self::new(code, error.to_string())
    }
}

impl From<ApiError> for ttrpc::Error {
    fn from(error: ApiError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(error.code, error.message))
    }
}
