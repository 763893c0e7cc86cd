//! Every message of the protocol, as protobuf messages written with `prost` derive macros.
//!
//! The protobuf schema *is* the explicit tags below, not the Rust types: a field is identified on the
//! wire by its tag number and wire type only. Rules that keep older peers working:
//!
//! - Never reuse or renumber a tag. Retired tags are listed in a comment where they were.
//! - New fields are optional by nature (proto3): an older peer skips the unknown tag, a newer peer
//!   reading an older peer's frame sees the field's default.
//! - A new message kind gets a new tag in [`Body`] (or in [`request::Op`] / [`response::Result`]).
//!   An older peer decodes such a frame with `body == None` and answers with an
//!   [`ErrorCode::Unsupported`] error instead of dropping the link.
//! - Enum-typed fields are carried as `i32`, so unknown values survive decoding; use the generated
//!   `field()` accessors (which map unknown values to the default) or `try_from`.
//!
//! Stream ids ([`IncomingConnection::stream_id`], [`StreamData::stream_id`], …) name one byte stream
//! or one HTTP exchange. The side that opens a stream picks its id: the agent uses even ids, the client
//! odd ids, so both sides can open streams without coordination. Request ids ([`Request::id`]) are
//! picked by the requester and echoed in the matching [`Response`].

use bytes::Bytes;

#[cfg(feature = "arbitrary")]
fn arbitrary_bytes(u: &mut arbitrary::Unstructured<'_>) -> arbitrary::Result<Bytes> {
    Ok(Bytes::from(<Vec<u8> as arbitrary::Arbitrary>::arbitrary(
        u,
    )?))
}

/// One frame on the link: sequencing header plus one message.
///
/// `seq` numbers the frames a side sends that must survive a reconnect (every kind except the
/// link-local ones, see [`Body::is_link_local`]); it starts at 1 and grows by one per frame. `ack`
/// carries the highest `seq` received in order from the peer, so the peer may drop what it kept for
/// replay up to there. Link-local frames carry `seq == 0`.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Frame {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(uint64, tag = "2")]
    pub ack: u64,
    #[prost(
        oneof = "Body",
        tags = "10, 11, 12, 13, 14, 15, 16, 17, 20, 21, 30, 31, 32, 33, 34, 35, 36, 37"
    )]
    pub body: Option<Body>,
}

/// The message a [`Frame`] carries.
#[derive(Clone, PartialEq, prost::Oneof)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Body {
    // Session and link control: 10..=19.
    /// Client → agent, first frame after the preface.
    #[prost(message, tag = "10")]
    Hello(Hello),
    /// Agent → client: the handshake succeeded.
    #[prost(message, tag = "11")]
    Welcome(Welcome),
    /// Either way: something failed. Before [`Welcome`], the sender closes the link after it.
    #[prost(message, tag = "12")]
    Error(ErrorInfo),
    #[prost(message, tag = "13")]
    Ping(Ping),
    #[prost(message, tag = "14")]
    Pong(Pong),
    /// Carries only the frame header's `ack`, when there is nothing else to send.
    #[prost(message, tag = "15")]
    Ack(Ack),
    /// Agent → client: a log line or a warning for the user.
    #[prost(message, tag = "16")]
    Log(Log),
    /// Either way: the session ends on purpose (no reconnect grace).
    #[prost(message, tag = "17")]
    Goodbye(Goodbye),

    // Request/response: 20..=29.
    #[prost(message, tag = "20")]
    Request(Request),
    #[prost(message, tag = "21")]
    Response(Response),

    // Streams: 30..=49.
    /// Agent → client: a TCP connection arrived on a subscribed port (stolen or mirrored).
    #[prost(message, tag = "30")]
    IncomingConnection(IncomingConnection),
    /// Agent → client: an HTTP request on a filtered port matched; its body follows as stream data.
    #[prost(message, tag = "31")]
    HttpRequestHead(HttpRequestHead),
    /// Client → agent: the response head for an [`HttpRequestHead`]'s stream.
    #[prost(message, tag = "32")]
    HttpResponseHead(HttpResponseHead),
    #[prost(message, tag = "33")]
    StreamData(StreamData),
    /// End of one direction of a stream (TCP FIN, end of an HTTP body with optional trailers).
    #[prost(message, tag = "34")]
    StreamEnd(StreamEnd),
    /// Abort of a whole stream (TCP RST, HTTP exchange abandoned).
    #[prost(message, tag = "35")]
    StreamReset(StreamReset),
    /// Flow control: the receiver grants the sender more bytes on a stream.
    #[prost(message, tag = "36")]
    WindowUpdate(WindowUpdate),
    /// One UDP datagram on an outgoing UDP stream.
    #[prost(message, tag = "37")]
    Datagram(Datagram),
}

impl Body {
    /// Link-local messages belong to one link, not to the session: they are not sequenced, not
    /// replayed after a reconnect, and carry `seq == 0`.
    pub fn is_link_local(&self) -> bool {
        matches!(
            self,
            Body::Hello(_) | Body::Welcome(_) | Body::Ping(_) | Body::Pong(_) | Body::Ack(_)
        )
    }

    /// A short stable name for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Hello(_) => "hello",
            Body::Welcome(_) => "welcome",
            Body::Error(_) => "error",
            Body::Ping(_) => "ping",
            Body::Pong(_) => "pong",
            Body::Ack(_) => "ack",
            Body::Log(_) => "log",
            Body::Goodbye(_) => "goodbye",
            Body::Request(_) => "request",
            Body::Response(_) => "response",
            Body::IncomingConnection(_) => "incoming_connection",
            Body::HttpRequestHead(_) => "http_request_head",
            Body::HttpResponseHead(_) => "http_response_head",
            Body::StreamData(_) => "stream_data",
            Body::StreamEnd(_) => "stream_end",
            Body::StreamReset(_) => "stream_reset",
            Body::WindowUpdate(_) => "window_update",
            Body::Datagram(_) => "datagram",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Session and link control.

/// Client → agent: who I am and how I prove it.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Hello {
    /// The session token the agent was started with. Compared in constant time.
    #[prost(string, tag = "1")]
    pub token: String,
    /// Free text naming the client, e.g. `tether/0.1.0`.
    #[prost(string, tag = "2")]
    pub client: String,
    /// Present when this link re-attaches to an existing session after a reconnect.
    #[prost(message, optional, tag = "3")]
    pub resume: Option<Resume>,
    /// Optional features the client understands (e.g. `"resume"`, `"http2"`).
    #[prost(string, repeated, tag = "4")]
    pub capabilities: Vec<String>,
    /// How the session survives a dropped link; absent: the session ends with its first link.
    #[prost(message, optional, tag = "5")]
    pub link: Option<LinkOptions>,
}

/// The client's link settings, so both sides ping, give up and wait alike.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct LinkOptions {
    /// Each side pings this often (milliseconds; 0: the agent's default).
    #[prost(uint64, tag = "1")]
    pub keepalive_interval_ms: u64,
    /// A side that hears nothing for this long declares the link dead (milliseconds).
    #[prost(uint64, tag = "2")]
    pub keepalive_timeout_ms: u64,
    /// How long the agent keeps the session without a link, waiting for the client to resume it
    /// (milliseconds). When it expires the session ends and its rules are removed.
    #[prost(uint64, tag = "3")]
    pub grace_ms: u64,
    /// Bytes each side keeps for replay (frames sent, not yet acknowledged).
    #[prost(uint64, tag = "4")]
    pub buffer_bytes: u64,
}

/// Re-attach to a session that outlived its link.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Resume {
    #[prost(string, tag = "1")]
    pub session_id: String,
    /// Highest `seq` the client received in order from the agent; the agent replays what follows.
    #[prost(uint64, tag = "2")]
    pub received: u64,
}

/// Agent → client: the session is up.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Welcome {
    #[prost(string, tag = "1")]
    pub session_id: String,
    /// Free text naming the agent, e.g. `tether-agent/0.1.0`.
    #[prost(string, tag = "2")]
    pub agent: String,
    /// True when [`Hello::resume`] named a live session and this link now carries it.
    #[prost(bool, tag = "3")]
    pub resumed: bool,
    /// On resume: highest `seq` the agent received in order from the client.
    #[prost(uint64, tag = "4")]
    pub received: u64,
    #[prost(string, repeated, tag = "5")]
    pub capabilities: Vec<String>,
}

/// What went wrong, for the peer and for the user.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ErrorInfo {
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    /// One line, written for the user.
    #[prost(string, tag = "2")]
    pub message: String,
    /// When the error answers a frame that has no request id (e.g. an unsupported message kind),
    /// the `seq` of that frame.
    #[prost(uint64, tag = "3")]
    pub in_reply_to_seq: u64,
    /// The Linux errno the operation failed with in the target, when there is one. The layer hands
    /// it to the local program unchanged.
    #[prost(int32, tag = "4")]
    pub errno: i32,
}

/// Error classes. Numbers are part of the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(i32)]
pub enum ErrorCode {
    Unspecified = 0,
    /// Missing or wrong session token.
    Unauthorized = 1,
    /// The peer does not know this message kind or request operation.
    Unsupported = 2,
    /// The message was understood but its content is invalid.
    BadRequest = 3,
    /// The thing named does not exist (file, host name, session, target).
    NotFound = 4,
    /// The port is already stolen by another session.
    PortInUse = 5,
    /// The target (network namespace, process, pod) went away.
    TargetGone = 6,
    /// The agent lacks a privilege it needs, or a path escapes the target's root.
    PermissionDenied = 7,
    /// A bug or an unexpected failure in the agent.
    Internal = 8,
    /// The peers' protocol major versions differ.
    VersionMismatch = 9,
    /// A system call failed; see `errno`.
    Io = 10,
    /// Temporary failure; trying again later may work (e.g. DNS `EAI_AGAIN`).
    Temporary = 11,
    /// A resumed session id is unknown or its grace period expired.
    SessionExpired = 12,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Ping {
    /// Echoed in the [`Pong`]; lets the sender measure the round trip.
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Pong {
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Ack {}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Log {
    #[prost(enumeration = "LogLevel", tag = "1")]
    pub level: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    /// The agent component that logged it, e.g. `steal`.
    #[prost(string, tag = "3")]
    pub target: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(i32)]
pub enum LogLevel {
    Unspecified = 0,
    Trace = 1,
    Debug = 2,
    Info = 3,
    /// Shown to the user without `-v`.
    Warn = 4,
    Error = 5,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Goodbye {
    #[prost(string, tag = "1")]
    pub reason: String,
}

// ---------------------------------------------------------------------------------------------
// Request/response.

/// A request that expects exactly one [`Response`] with the same `id`.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Request {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(oneof = "request::Op", tags = "10, 11, 12, 13, 14, 15")]
    pub op: Option<request::Op>,
}

pub mod request {
    //! The operations a [`Request`](super::Request) can carry.
    use super::*;

    #[derive(Clone, PartialEq, prost::Oneof)]
    #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
    pub enum Op {
        #[prost(message, tag = "10")]
        PortSubscribe(PortSubscribe),
        #[prost(message, tag = "11")]
        PortUnsubscribe(PortUnsubscribe),
        #[prost(message, tag = "12")]
        OutgoingConnect(OutgoingConnect),
        #[prost(message, tag = "13")]
        DnsLookup(DnsLookup),
        #[prost(message, tag = "14")]
        EnvGet(EnvGet),
        #[prost(message, tag = "15")]
        Fs(FsRequest),
    }
}

/// The answer to the [`Request`] with the same `id`.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Response {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(oneof = "response::Result", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub result: Option<response::Result>,
}

pub mod response {
    //! The results a [`Response`](super::Response) can carry.
    use super::*;

    #[derive(Clone, PartialEq, prost::Oneof)]
    #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
    pub enum Result {
        #[prost(message, tag = "10")]
        Error(ErrorInfo),
        /// Success with nothing to report (e.g. unsubscribe).
        #[prost(message, tag = "11")]
        Done(Done),
        #[prost(message, tag = "12")]
        Subscribed(Subscribed),
        #[prost(message, tag = "13")]
        Connected(Connected),
        #[prost(message, tag = "14")]
        DnsAnswer(DnsAnswer),
        #[prost(message, tag = "15")]
        Env(Env),
        #[prost(message, tag = "16")]
        Fs(FsResponse),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Done {}

// ---------------------------------------------------------------------------------------------
// Incoming traffic.

/// Start receiving the traffic of a port in the target.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PortSubscribe {
    /// The port in the target (after the client applied its port mapping).
    #[prost(uint32, tag = "1")]
    pub port: u32,
    #[prost(enumeration = "SubscriptionMode", tag = "2")]
    pub mode: i32,
    /// Only requests that match are stolen (or mirrored); absent means the whole port.
    #[prost(message, optional, tag = "3")]
    pub http_filter: Option<HttpFilter>,
    /// Also steal requests from the kubelet (`User-Agent: kube-probe/…`). Off by default.
    #[prost(bool, tag = "4")]
    pub steal_probes: bool,
    /// Close existing connections to the port so their clients reconnect into the steal.
    #[prost(bool, tag = "5")]
    pub flush_connections: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(i32)]
pub enum SubscriptionMode {
    Unspecified = 0,
    /// Copy the traffic; the target's app keeps answering.
    Mirror = 1,
    /// Take the traffic; the client's app answers.
    Steal = 2,
}

/// A request filter. Regexes use the syntax of the `regex` crate.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HttpFilter {
    #[prost(oneof = "http_filter::Rule", tags = "1, 2, 3, 4, 5")]
    pub rule: Option<http_filter::Rule>,
}

pub mod http_filter {
    //! The rules an [`HttpFilter`](super::HttpFilter) can hold.
    use super::*;

    #[derive(Clone, PartialEq, prost::Oneof)]
    #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
    pub enum Rule {
        /// Matched against each header as `Name: value` (name case-insensitive).
        #[prost(string, tag = "1")]
        Header(String),
        /// Matched against the path, then against path and query.
        #[prost(string, tag = "2")]
        Path(String),
        /// Matched against the method.
        #[prost(string, tag = "3")]
        Method(String),
        #[prost(message, tag = "4")]
        AllOf(HttpFilterList),
        #[prost(message, tag = "5")]
        AnyOf(HttpFilterList),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HttpFilterList {
    #[prost(message, repeated, tag = "1")]
    pub filters: Vec<HttpFilter>,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Subscribed {
    #[prost(uint32, tag = "1")]
    pub port: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PortUnsubscribe {
    #[prost(uint32, tag = "1")]
    pub port: u32,
}

/// An IP socket address: `ip` holds 4 (IPv4) or 16 (IPv6) bytes in network order.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SocketAddr {
    #[prost(bytes = "bytes", tag = "1")]
    #[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_bytes))]
    pub ip: Bytes,
    #[prost(uint32, tag = "2")]
    pub port: u32,
}

/// A TCP connection to a subscribed port. Its client → target bytes follow as [`StreamData`] on
/// `stream_id`; for a steal, the client's answer goes back on the same stream.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct IncomingConnection {
    #[prost(uint64, tag = "1")]
    pub stream_id: u64,
    #[prost(enumeration = "SubscriptionMode", tag = "2")]
    pub mode: i32,
    /// The original destination in the target (address and subscribed port).
    #[prost(message, optional, tag = "3")]
    pub local: Option<SocketAddr>,
    /// The remote peer that opened the connection.
    #[prost(message, optional, tag = "4")]
    pub remote: Option<SocketAddr>,
}

/// One header field. Values are bytes: HTTP allows non-UTF-8 values.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Header {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(bytes = "bytes", tag = "2")]
    #[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_bytes))]
    pub value: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(i32)]
pub enum HttpVersion {
    Unspecified = 0,
    Http10 = 1,
    Http11 = 2,
    Http2 = 3,
}

/// A matching HTTP request. Its body follows as [`StreamData`] ended by [`StreamEnd`] (with
/// trailers, if any); the answer comes back as [`HttpResponseHead`] plus body on the same stream.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HttpRequestHead {
    #[prost(uint64, tag = "1")]
    pub stream_id: u64,
    /// The TCP connection (or HTTP/2 connection) the request came on, for the client's grouping.
    #[prost(uint64, tag = "2")]
    pub connection_id: u64,
    #[prost(message, optional, tag = "3")]
    pub local: Option<SocketAddr>,
    #[prost(message, optional, tag = "4")]
    pub remote: Option<SocketAddr>,
    #[prost(string, tag = "5")]
    pub method: String,
    /// Request target as sent: path and query (HTTP/1) or the full URI (HTTP/2).
    #[prost(string, tag = "6")]
    pub uri: String,
    #[prost(enumeration = "HttpVersion", tag = "7")]
    pub version: i32,
    #[prost(message, repeated, tag = "8")]
    pub headers: Vec<Header>,
    /// `Mirror` for a copy of a request the target's app answers (the client's answer is
    /// dropped); `Steal` (or unset, from older agents) for a request the client answers.
    #[prost(enumeration = "SubscriptionMode", tag = "9")]
    pub mode: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HttpResponseHead {
    #[prost(uint64, tag = "1")]
    pub stream_id: u64,
    #[prost(uint32, tag = "2")]
    pub status: u32,
    #[prost(enumeration = "HttpVersion", tag = "3")]
    pub version: i32,
    #[prost(message, repeated, tag = "4")]
    pub headers: Vec<Header>,
}

// ---------------------------------------------------------------------------------------------
// Streams.

/// Bytes on a stream, in order. A sender keeps the bytes in flight on a stream within the window
/// the receiver granted ([`INITIAL_STREAM_WINDOW`](crate::INITIAL_STREAM_WINDOW) plus every
/// [`WindowUpdate`] since).
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct StreamData {
    #[prost(uint64, tag = "1")]
    pub stream_id: u64,
    #[prost(bytes = "bytes", tag = "2")]
    #[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_bytes))]
    pub data: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct StreamEnd {
    #[prost(uint64, tag = "1")]
    pub stream_id: u64,
    /// HTTP trailers that close a body; empty otherwise.
    #[prost(message, repeated, tag = "2")]
    pub trailers: Vec<Header>,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct StreamReset {
    #[prost(uint64, tag = "1")]
    pub stream_id: u64,
    #[prost(string, tag = "2")]
    pub reason: String,
    /// The errno to surface locally (e.g. `ECONNRESET`), 0 when none applies.
    #[prost(int32, tag = "3")]
    pub errno: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct WindowUpdate {
    #[prost(uint64, tag = "1")]
    pub stream_id: u64,
    #[prost(uint32, tag = "2")]
    pub increment: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Datagram {
    #[prost(uint64, tag = "1")]
    pub stream_id: u64,
    #[prost(bytes = "bytes", tag = "2")]
    #[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_bytes))]
    pub data: Bytes,
    /// For unconnected UDP sockets: the peer (destination when sent by the client, source when
    /// sent by the agent).
    #[prost(message, optional, tag = "3")]
    pub peer: Option<SocketAddr>,
}

// ---------------------------------------------------------------------------------------------
// Outgoing traffic, DNS, environment.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(i32)]
pub enum Transport {
    Unspecified = 0,
    Tcp = 1,
    Udp = 2,
}

/// Open a connection from the target's network namespace. On success the stream `stream_id`
/// (picked by the client) carries its bytes ([`StreamData`]) or datagrams ([`Datagram`]).
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct OutgoingConnect {
    #[prost(uint64, tag = "1")]
    pub stream_id: u64,
    #[prost(enumeration = "Transport", tag = "2")]
    pub transport: i32,
    #[prost(message, optional, tag = "3")]
    pub remote: Option<SocketAddr>,
    /// The name the address came from, when the client resolved it through the agent (for logs).
    #[prost(string, tag = "4")]
    pub hostname: String,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Connected {
    #[prost(uint64, tag = "1")]
    pub stream_id: u64,
    /// The socket's local address in the target.
    #[prost(message, optional, tag = "2")]
    pub local: Option<SocketAddr>,
    #[prost(message, optional, tag = "3")]
    pub remote: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(i32)]
pub enum AddressFamily {
    Any = 0,
    Ipv4 = 1,
    Ipv6 = 2,
}

/// Resolve a name as the target would (its resolv.conf and hosts file); or, with `address`
/// (4 or 16 bytes) and no name, find the address's name (hosts file, then PTR). An agent that
/// predates `address` answers an empty name with an error.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct DnsLookup {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "AddressFamily", tag = "2")]
    pub family: i32,
    #[prost(bytes = "bytes", tag = "3")]
    #[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_bytes))]
    pub address: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct DnsAnswer {
    /// Each 4 or 16 bytes, in the resolver's order.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    #[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_bytes_list))]
    pub addresses: Vec<Bytes>,
    #[prost(string, tag = "2")]
    pub canonical_name: String,
}

#[cfg(feature = "arbitrary")]
fn arbitrary_bytes_list(u: &mut arbitrary::Unstructured<'_>) -> arbitrary::Result<Vec<Bytes>> {
    let list = <Vec<Vec<u8>> as arbitrary::Arbitrary>::arbitrary(u)?;
    Ok(list.into_iter().map(Bytes::from).collect())
}

/// Ask for the environment of the target's main process.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct EnvGet {}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Env {
    #[prost(message, repeated, tag = "1")]
    pub vars: Vec<EnvVar>,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct EnvVar {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

// ---------------------------------------------------------------------------------------------
// Files. Paths are resolved by the agent under the target's root and never escape it.

/// A file-system operation in the target.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsRequest {
    #[prost(
        oneof = "fs_request::Op",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13"
    )]
    pub op: Option<fs_request::Op>,
}

pub mod fs_request {
    //! The operations an [`FsRequest`](super::FsRequest) can carry.
    use super::*;

    #[derive(Clone, PartialEq, prost::Oneof)]
    #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
    pub enum Op {
        #[prost(message, tag = "1")]
        Open(FsOpen),
        #[prost(message, tag = "2")]
        Read(FsRead),
        #[prost(message, tag = "3")]
        Write(FsWrite),
        #[prost(message, tag = "4")]
        Seek(FsSeek),
        #[prost(message, tag = "5")]
        Close(FsHandle),
        #[prost(message, tag = "6")]
        Stat(FsStat),
        #[prost(message, tag = "7")]
        ReadDir(FsHandle),
        #[prost(message, tag = "8")]
        ReadLink(FsPath),
        #[prost(message, tag = "9")]
        Access(FsAccess),
        #[prost(message, tag = "10")]
        Unlink(FsPath),
        #[prost(message, tag = "11")]
        Mkdir(FsMkdir),
        #[prost(message, tag = "12")]
        Rename(FsRename),
        #[prost(message, tag = "13")]
        RealPath(FsPath),
    }
}

/// Portable open flags (not the platform's `O_*` values).
pub mod open_flags {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 1 << 1;
    pub const CREATE: u32 = 1 << 2;
    pub const TRUNCATE: u32 = 1 << 3;
    pub const APPEND: u32 = 1 << 4;
    pub const EXCLUSIVE: u32 = 1 << 5;
    pub const DIRECTORY: u32 = 1 << 6;
    pub const NOFOLLOW: u32 = 1 << 7;
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsOpen {
    #[prost(string, tag = "1")]
    pub path: String,
    /// Bits from [`open_flags`].
    #[prost(uint32, tag = "2")]
    pub flags: u32,
    /// Permission bits for a created file.
    #[prost(uint32, tag = "3")]
    pub mode: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsHandle {
    #[prost(uint64, tag = "1")]
    pub handle: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsRead {
    #[prost(uint64, tag = "1")]
    pub handle: u64,
    /// At most this many bytes (the agent may cap it).
    #[prost(uint32, tag = "2")]
    pub len: u32,
    /// Read at this offset without moving the file position (`pread`); absent: at the position.
    #[prost(uint64, optional, tag = "3")]
    pub offset: Option<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsWrite {
    #[prost(uint64, tag = "1")]
    pub handle: u64,
    #[prost(bytes = "bytes", tag = "2")]
    #[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_bytes))]
    pub data: Bytes,
    #[prost(uint64, optional, tag = "3")]
    pub offset: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(i32)]
pub enum Whence {
    Set = 0,
    Current = 1,
    End = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsSeek {
    #[prost(uint64, tag = "1")]
    pub handle: u64,
    #[prost(int64, tag = "2")]
    pub offset: i64,
    #[prost(enumeration = "Whence", tag = "3")]
    pub whence: i32,
}

/// `stat` by path, or `fstat` by handle when `path` is empty.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsStat {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(uint64, tag = "2")]
    pub handle: u64,
    /// `lstat` when false.
    #[prost(bool, tag = "3")]
    pub follow_symlinks: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsPath {
    #[prost(string, tag = "1")]
    pub path: String,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsAccess {
    #[prost(string, tag = "1")]
    pub path: String,
    /// `R_OK | W_OK | X_OK` bits as in POSIX (4, 2, 1); 0 tests existence.
    #[prost(uint32, tag = "2")]
    pub mode: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsMkdir {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(uint32, tag = "2")]
    pub mode: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsRename {
    #[prost(string, tag = "1")]
    pub from: String,
    #[prost(string, tag = "2")]
    pub to: String,
}

/// The result of an [`FsRequest`]; failures come as [`response::Result::Error`] with an errno.
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsResponse {
    #[prost(oneof = "fs_response::Result", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub result: Option<fs_response::Result>,
}

pub mod fs_response {
    //! The results an [`FsResponse`](super::FsResponse) can carry.
    use super::*;

    #[derive(Clone, PartialEq, prost::Oneof)]
    #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
    pub enum Result {
        #[prost(message, tag = "1")]
        Opened(FsHandle),
        #[prost(message, tag = "2")]
        Data(FsData),
        #[prost(uint64, tag = "3")]
        Written(u64),
        #[prost(uint64, tag = "4")]
        Position(u64),
        #[prost(message, tag = "5")]
        Stat(FileStat),
        #[prost(message, tag = "6")]
        Entries(DirEntries),
        /// `readlink` and `realpath` results.
        #[prost(string, tag = "7")]
        Path(String),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FsData {
    #[prost(bytes = "bytes", tag = "1")]
    #[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_bytes))]
    pub data: Bytes,
    #[prost(bool, tag = "2")]
    pub eof: bool,
}

/// `struct stat`, in portable units (times in nanoseconds since the Unix epoch).
#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FileStat {
    #[prost(uint32, tag = "1")]
    pub mode: u32,
    #[prost(uint64, tag = "2")]
    pub size: u64,
    #[prost(uint64, tag = "3")]
    pub nlink: u64,
    #[prost(uint32, tag = "4")]
    pub uid: u32,
    #[prost(uint32, tag = "5")]
    pub gid: u32,
    #[prost(int64, tag = "6")]
    pub atime_ns: i64,
    #[prost(int64, tag = "7")]
    pub mtime_ns: i64,
    #[prost(int64, tag = "8")]
    pub ctime_ns: i64,
    #[prost(uint64, tag = "9")]
    pub ino: u64,
    #[prost(uint64, tag = "10")]
    pub dev: u64,
    #[prost(uint64, tag = "11")]
    pub rdev: u64,
    #[prost(uint64, tag = "12")]
    pub blksize: u64,
    #[prost(uint64, tag = "13")]
    pub blocks: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct DirEntries {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<DirEntry>,
    /// True when the directory has no more entries after these.
    #[prost(bool, tag = "2")]
    pub done: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct DirEntry {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub ino: u64,
    /// `d_type` as in Linux `dirent` (DT_REG = 8, DT_DIR = 4, DT_LNK = 10, …).
    #[prost(uint32, tag = "3")]
    pub kind: u32,
}
