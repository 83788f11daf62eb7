//! Committed offsets of many consumer groups through one client: librdkafka's
//! `ListConsumerGroupOffsets` admin request (an OffsetFetch to each group's coordinator),
//! which the rdkafka crate does not wrap. The only unsafe code of the operator lives here.
//!
//! The requests go out on a queue of their own, at most `max_in_flight` at a time, and the
//! answers are matched to their group through the request's opaque (its index). Every
//! librdkafka object created here is destroyed before the function returns, whatever the
//! outcome; an answer that arrives after the deadline lands on the queue and is destroyed
//! with it.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_void};
use std::ptr;
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;
use rdkafka::client::{Client, ClientContext};

/// The committed offset of each partition of a group, by (topic, partition). Partitions
/// without a committed offset are absent.
pub type Committed = HashMap<(String, i32), i64>;

/// Why one group's offsets could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupError {
    /// No answer before the deadline.
    Timeout,
    /// Kafka answered with an error.
    Kafka(String),
    /// The broker asked is not (or no longer) the group's coordinator. librdkafka keeps the
    /// coordinator it found for a group in its client's cache for as long as the cache is
    /// used, so a long-lived client asks the same broker again on every pass: only a new
    /// client looks the coordinator up again.
    CoordinatorMoved(String),
}

/// The error codes that say the group's coordinator is elsewhere or not known.
fn coordinator_moved(code: rd::rd_kafka_resp_err_t) -> bool {
    use rd::rd_kafka_resp_err_t::*;
    matches!(
        code,
        RD_KAFKA_RESP_ERR_NOT_COORDINATOR | RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE
    )
}

/// Reads the committed offsets of `groups` (blocking, by `deadline`). The result has one
/// entry per group.
pub fn list<C: ClientContext>(
    client: &Client<C>,
    groups: &[String],
    max_in_flight: usize,
    deadline: Instant,
) -> Vec<Result<Committed, GroupError>> {
    let mut out: Vec<Option<Result<Committed, GroupError>>> = vec![None; groups.len()];
    if groups.is_empty() {
        return Vec::new();
    }
    let rk = client.native_ptr();
    // SAFETY: `rk` is a live client handle for the whole function (borrowed `client`).
    let queue = Queue(unsafe { rd::rd_kafka_queue_new(rk) });
    let mut next = 0;
    let mut pending = 0usize;
    let max_in_flight = max_in_flight.max(1);
    loop {
        while pending < max_in_flight && next < groups.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match send(rk, &queue, &groups[next], next, left) {
                Ok(()) => pending += 1,
                Err(e) => out[next] = Some(Err(e)),
            }
            next += 1;
        }
        if pending == 0 {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let wait = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: the queue is live; a returned event is owned here and destroyed below.
        let event = unsafe { rd::rd_kafka_queue_poll(queue.0, wait) };
        if event.is_null() {
            continue;
        }
        let event = Event(event);
        // SAFETY: `event` is a live event.
        let kind = unsafe { rd::rd_kafka_event_type(event.0) };
        if kind != rd::RD_KAFKA_EVENT_LISTCONSUMERGROUPOFFSETS_RESULT as rd::rd_kafka_event_type_t {
            continue;
        }
        // SAFETY: the opaque was set to the request's index in `send`.
        let index = unsafe { rd::rd_kafka_event_opaque(event.0) } as usize;
        if index >= groups.len() || out[index].is_some() {
            continue;
        }
        pending -= 1;
        out[index] = Some(read_result(&event));
    }
    out.into_iter()
        .map(|r| r.unwrap_or(Err(GroupError::Timeout)))
        .collect()
}

struct Queue(*mut rd::rd_kafka_queue_t);

impl Drop for Queue {
    fn drop(&mut self) {
        // Events still on the queue (late answers) are destroyed with it.
        loop {
            // SAFETY: the queue is live until destroyed below.
            let e = unsafe { rd::rd_kafka_queue_poll(self.0, 0) };
            if e.is_null() {
                break;
            }
            // SAFETY: a polled event is owned by the caller.
            unsafe { rd::rd_kafka_event_destroy(e) };
        }
        // SAFETY: created by rd_kafka_queue_new and destroyed once.
        unsafe { rd::rd_kafka_queue_destroy(self.0) };
    }
}

struct Event(*mut rd::rd_kafka_event_t);

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: owned, destroyed once.
        unsafe { rd::rd_kafka_event_destroy(self.0) };
    }
}

fn send(
    rk: *mut rd::rd_kafka_t,
    queue: &Queue,
    group: &str,
    index: usize,
    timeout: Duration,
) -> Result<(), GroupError> {
    let name = CString::new(group)
        .map_err(|_| GroupError::Kafka("the group id contains a NUL byte".into()))?;
    let timeout_ms = i32::try_from(timeout.as_millis())
        .unwrap_or(i32::MAX)
        .max(1);
    // SAFETY: `rk` is live; every object created here is destroyed before returning
    // (librdkafka copies the request and the options when the call is made).
    unsafe {
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPOFFSETS,
        );
        let mut errstr = [0 as std::ffi::c_char; 256];
        let err = rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            rd::rd_kafka_AdminOptions_destroy(options);
            let msg = CStr::from_ptr(errstr.as_ptr())
                .to_string_lossy()
                .into_owned();
            return Err(GroupError::Kafka(msg));
        }
        rd::rd_kafka_AdminOptions_set_opaque(options, index as *mut c_void);
        let mut request = rd::rd_kafka_ListConsumerGroupOffsets_new(name.as_ptr(), ptr::null());
        rd::rd_kafka_ListConsumerGroupOffsets(rk, &mut request, 1, options, queue.0);
        rd::rd_kafka_ListConsumerGroupOffsets_destroy(request);
        rd::rd_kafka_AdminOptions_destroy(options);
    }
    Ok(())
}

fn text(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: librdkafka returns NUL-terminated strings that live as long as their event.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn read_result(event: &Event) -> Result<Committed, GroupError> {
    // SAFETY: everything read here is owned by `event`, which outlives this function's use
    // of it; strings are copied out.
    unsafe {
        let err = rd::rd_kafka_event_error(event.0);
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__TIMED_OUT {
                return Err(GroupError::Timeout);
            }
            let message = text(rd::rd_kafka_event_error_string(event.0));
            if coordinator_moved(err) {
                return Err(GroupError::CoordinatorMoved(message));
            }
            return Err(GroupError::Kafka(message));
        }
        let result = rd::rd_kafka_event_ListConsumerGroupOffsets_result(event.0);
        if result.is_null() {
            return Err(GroupError::Kafka("an empty answer".into()));
        }
        let mut count = 0usize;
        let groups = rd::rd_kafka_ListConsumerGroupOffsets_result_groups(result, &mut count);
        if groups.is_null() || count == 0 {
            return Err(GroupError::Kafka("an answer without the group".into()));
        }
        let group = *groups;
        let gerr = rd::rd_kafka_group_result_error(group);
        if !gerr.is_null() {
            let code = rd::rd_kafka_error_code(gerr);
            if code == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__TIMED_OUT {
                return Err(GroupError::Timeout);
            }
            let message = text(rd::rd_kafka_error_string(gerr));
            if coordinator_moved(code) {
                return Err(GroupError::CoordinatorMoved(message));
            }
            return Err(GroupError::Kafka(message));
        }
        let list = rd::rd_kafka_group_result_partitions(group);
        let mut out = Committed::new();
        if list.is_null() {
            return Ok(out);
        }
        let list = &*list;
        for i in 0..usize::try_from(list.cnt).unwrap_or(0) {
            let p = &*list.elems.add(i);
            if p.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                let topic = text(p.topic);
                return Err(GroupError::Kafka(format!(
                    "{topic}[{}]: {}",
                    p.partition,
                    text(rd::rd_kafka_err2str(p.err))
                )));
            }
            if p.offset >= 0 {
                out.insert((text(p.topic), p.partition), p.offset);
            }
        }
        Ok(out)
    }
}
