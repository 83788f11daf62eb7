//! The lag client against an in-process Kafka (librdkafka's mock cluster, on 127.0.0.1),
//! which can answer with the one error the real test bed cannot be made to give on demand:
//! `NOT_COORDINATOR` to an OffsetFetch, as a broker does when the group's coordinator moved
//! (a broker restart, a leader change of `__consumer_offsets`, a fresh cluster loading it),
//! and an OffsetFetch that one connection never gets answered in time while a new one does.
//!
//! librdkafka 2.12 handles that error by asking the client's own consumer group to look up
//! its coordinator again, and a client without a `group.id` has none: it crashed the whole
//! operator (SIGSEGV in `rd_kafka_cgrp_op`, librdkafka issue #5040). Seen on the test bed
//! as an operator that vanished a minute after a fresh `make env-up`.

#![allow(unsafe_code)]

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::bindings as rd;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sluice_operator::lag::{LagClient, LagError, Query, Retried, query_retrying};

type Props = Vec<(String, String)>;

/// A one-broker mock cluster with a topic of 2 partitions, a lag client on it, and a query
/// of that topic and two groups.
fn setup() -> (
    MockCluster<'static, DefaultProducerContext>,
    Props,
    LagClient,
    Query,
) {
    let mock = MockCluster::new(1).expect("librdkafka's mock cluster");
    mock.create_topic("orders", 2, 1).expect("a mock topic");
    let props = vec![("bootstrap.servers".to_owned(), mock.bootstrap_servers())];
    let client = LagClient::new(&props, "orders-group").expect("a lag client");
    let query = Query {
        topics: ["orders".to_owned()].into(),
        groups: ["orders-group".to_owned(), "other-group".to_owned()].into(),
    };
    (mock, props, client, query)
}

/// The retry's answer: the topic's ends, every group's offsets (none committed: empty)
/// rather than an error, and a new client to take the old one's place.
fn assert_read_again(retried: Retried, query: &Query) {
    let answer = retried.answer.expect("the cluster answers");
    assert!(answer.topics["orders"].is_ok(), "{answer:?}");
    for group in &query.groups {
        assert_eq!(
            answer.groups[group],
            Ok(Default::default()),
            "{group}: read again, not an error: {answer:?}"
        );
    }
    assert!(
        retried.new_client.is_some(),
        "the new client takes the old one's place"
    );
}

#[test]
fn a_moved_group_coordinator_is_an_error_of_that_group_not_a_crash() {
    let (mock, props, client, query) = setup();

    // Every OffsetFetch answered NOT_COORDINATOR: each group's offsets are an error, the
    // topic's ends are still read, and the process lives on.
    mock.request_errors(
        RDKafkaApiKey::OffsetFetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 16],
    );
    let answer = client
        .query_blocking(&query, Duration::from_secs(10), 4)
        .expect("the cluster answers");
    assert!(answer.topics["orders"].is_ok(), "{answer:?}");
    for group in &query.groups {
        assert!(
            matches!(answer.groups[group], Err(LagError::CoordinatorMoved(_))),
            "{group}: the coordinator moved, not offsets: {answer:?}"
        );
    }

    // The coordinator back: a new client (the collector replaces the one that met a moved
    // coordinator) reads the offsets (none committed: empty).
    mock.clear_request_errors(RDKafkaApiKey::OffsetFetch);
    drop(client);
    let client = LagClient::new(&props, "orders-group").expect("a new lag client");
    let answer = client
        .query_blocking(&query, Duration::from_secs(10), 4)
        .expect("the cluster answers");
    for group in &query.groups {
        assert_eq!(
            answer.groups[group],
            Ok(Default::default()),
            "{group}: {answer:?}"
        );
    }
}

/// The collector reads a moved group again in the same pass, through a new client (the old
/// one would ask the broker it found first until it is replaced): the group's lag is not
/// stale for a pass.
#[test]
fn a_moved_group_is_read_again_at_once_through_a_new_client() {
    let (mock, props, client, query) = setup();
    let retry = || {
        query_retrying(
            &client,
            &props,
            "orders-group",
            &query,
            Duration::from_secs(10),
            4,
        )
    };
    // One refusal per group: the client's OffsetFetch of each group is refused. Asked
    // once, both groups are errors (the lag would be stale for a pass)…
    let refuse_once = || {
        mock.request_errors(
            RDKafkaApiKey::OffsetFetch,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 2],
        )
    };
    refuse_once();
    let once = client
        .query_blocking(&query, Duration::from_secs(10), 4)
        .expect("the cluster answers");
    assert_eq!(once.moved_groups().len(), 2, "{once:?}");
    // …and with the retry the new client's requests are answered.
    refuse_once();
    assert_read_again(retry(), &query);

    // Nothing moved: one query, no new client.
    let retried = retry();
    assert!(retried.answer.is_ok_and(|a| a.moved_groups().is_empty()));
    assert!(retried.new_client.is_none());

    // Still refused through the new client: the groups stay errors (stale), and the
    // caller learns that the coordinator moved.
    mock.request_errors(
        RDKafkaApiKey::OffsetFetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 16],
    );
    let retried = retry();
    let answer = retried.answer.expect("the cluster answers");
    assert_eq!(answer.moved_groups().len(), 2, "{answer:?}");
}

/// After a rolling restart of a secured cluster, one long-lived lag client's
/// committed-offset requests went unanswered for good while a new client was answered at
/// once (README, "End to end"). Here the mock broker holds the answers to the first client's
/// two OffsetFetch requests for 60 s (one per group; the next requests, from any
/// connection, are answered at once): the groups are read again through a new client in
/// the same query, within its budget, instead of staying stale for a pass or more.
#[test]
fn groups_left_unanswered_are_read_again_at_once_through_a_new_client() {
    let producer: BaseProducer = ClientConfig::new()
        .set("test.mock.num.brokers", "1")
        .create()
        .expect("a client with a mock cluster");
    let mock = producer.client().mock_cluster().expect("its mock cluster");
    mock.create_topic("orders", 2, 1).expect("a mock topic");
    // SAFETY: the producer owns the mock cluster and outlives every use of this pointer.
    let raw = unsafe { rd::rd_kafka_handle_mock_cluster(producer.client().native_ptr()) };
    assert!(!raw.is_null());
    let props = vec![("bootstrap.servers".to_owned(), mock.bootstrap_servers())];
    let client = LagClient::new(&props, "orders-group").expect("a lag client");
    let query = Query {
        topics: ["orders".to_owned()].into(),
        groups: ["orders-group".to_owned(), "other-group".to_owned()].into(),
    };
    // Warm: the client knows the coordinator and has its connection.
    let warm = client
        .query_blocking(&query, Duration::from_secs(10), 4)
        .expect("the cluster answers");
    assert!(warm.groups_to_read_again().is_empty(), "{warm:?}");

    let hold = |n: usize| {
        const HELD_MS: i32 = 60_000;
        let ok = rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
        for _ in 0..n {
            // SAFETY: a live mock cluster; one (error, rtt) pair as the count says.
            let err = unsafe {
                rd::rd_kafka_mock_broker_push_request_error_rtts(
                    raw,
                    1,
                    RDKafkaApiKey::OffsetFetch as i16,
                    1,
                    ok,
                    HELD_MS,
                )
            };
            assert_eq!(err, ok, "pushing a held answer");
        }
    };
    let budget = Duration::from_secs(6);

    // Asked once, both groups time out: their lag would be stale for the pass.
    hold(2);
    let once = client
        .query_blocking(&query, budget, 4)
        .expect("the cluster answers");
    assert!(once.topics["orders"].is_ok(), "{once:?}");
    for group in &query.groups {
        assert!(
            matches!(once.groups[group], Err(LagError::Timeout(_))),
            "{group}: held, so no answer in time: {once:?}"
        );
    }

    // With the retry, the new client reads both within the budget.
    let client = LagClient::new(&props, "orders-group").expect("a lag client");
    client
        .query_blocking(&query, Duration::from_secs(10), 4)
        .expect("the cluster answers");
    hold(2);
    let started = Instant::now();
    let retried = query_retrying(&client, &props, "orders-group", &query, budget, 4);
    let took = started.elapsed();
    assert_read_again(retried, &query);
    assert!(
        took < budget + Duration::from_secs(1),
        "within the budget: {took:?}"
    );
}
