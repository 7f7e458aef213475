//! What can go wrong between a replica and Redis.

/// A replica's error: each is typed, none panics, and none corrupts the local engine.
#[derive(Debug)]
pub enum Error {
    /// Redis could not be reached, refused the connection, or did not answer in time: the
    /// replica serves from its leases, then from its outage share.
    Unreachable(String),
    /// Redis answered with an error.
    Redis(String),
    /// Redis answered something of the wrong shape (another program's function of our name, a
    /// proxy in between, a damaged reply).
    Answer(&'static str),
    /// Redis no longer knows a lease's running sums (the lease was silent for longer than a
    /// scope's hash lives): its call changed nothing, and the lease goes on under a new name.
    Forgotten,
    /// The local engine refused its configuration.
    Engine(sluicegate_core::Error),
    /// The background thread could not be started.
    Thread(std::io::Error),
}

impl Error {
    pub(crate) fn from_redis(e: redis::RedisError) -> Self {
        if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() || e.is_connection_dropped() {
            Error::Unreachable(e.to_string())
        } else {
            Error::Redis(e.to_string())
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unreachable(e) => write!(f, "redis unreachable: {e}"),
            Error::Redis(e) => write!(f, "redis error: {e}"),
            Error::Answer(what) => write!(f, "unexpected redis answer: {what}"),
            Error::Forgotten => write!(f, "redis no longer knows this lease's sums"),
            Error::Engine(e) => write!(f, "{e}"),
            Error::Thread(e) => write!(f, "cannot start the lease thread: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<sluicegate_core::Error> for Error {
    fn from(e: sluicegate_core::Error) -> Self {
        Error::Engine(e)
    }
}
