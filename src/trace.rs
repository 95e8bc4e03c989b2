//! W3C Trace Context across the queue: an event can carry the
//! [`traceparent`](https://www.w3.org/TR/trace-context/#traceparent-header)
//! of the code that enqueued it, stored in the nullable `traceparent`
//! column. The dispatcher's delivery span records it (and, with the
//! `opentelemetry` feature, links to it), and the relay sends it on as a
//! `traceparent` header.

/// Whether `text` is a traceparent this crate stores and passes on:
/// `VERSION-TRACEID-PARENTID-FLAGS` in lowercase hex (2, 32, 16 and 2
/// digits), version not `ff`, trace and parent ids not all zeros. What
/// another program wrote into the column is checked again before it is
/// sent anywhere.
pub fn is_valid_traceparent(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let [version, trace_id, parent_id, flags] = parts[..] else {
        return false;
    };
    hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && hex(flags, 2)
}

/// The traceparent of the current `tracing` span's OpenTelemetry context,
/// if it has a valid one.
#[cfg(feature = "opentelemetry")]
pub(crate) fn current() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Without the `opentelemetry` feature there is no context to read.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn current() -> Option<String> {
    None
}

/// Links the current span to the span context `traceparent` names.
#[cfg(feature = "opentelemetry")]
pub(crate) fn link_current(traceparent: &str) {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !is_valid_traceparent(traceparent) {
        return;
    }
    let mut parts = traceparent.split('-').skip(1);
    let (Some(trace), Some(parent), Some(flags)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let (Ok(trace), Ok(parent), Ok(flags)) = (
        TraceId::from_hex(trace),
        SpanId::from_hex(parent),
        u8::from_str_radix(flags, 16),
    ) else {
        return;
    };
    let remote = SpanContext::new(
        trace,
        parent,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    tracing::Span::current().add_link(remote);
}

#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn link_current(_traceparent: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_traceparents_pass() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(is_valid_traceparent(good));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-Evil: 1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad:?}");
        }
    }
}
