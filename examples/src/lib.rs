//! The order -> inventory demo shared by its two programs.
//!
//! * `order-service` (on the host) publishes [`OrderCreated`] events keyed by order id and
//!   drives the demo: it applies the `inventory` EventConsumer, shows progress, rolls the
//!   pods halfway and prints a summary.
//! * `inventory` (in the pods, behind the Sluice sidecar) reserves stock for each order and
//!   sends a [`Receipt`] line to the order service before it answers the sidecar, so the demo
//!   can count delivered, duplicated and lost orders even across pod restarts.

use serde::{Deserialize, Serialize};

pub mod report;

/// The event the order service publishes (JSON, Kafka key = `order_id`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCreated {
    #[serde(rename = "type")]
    pub kind: String,
    pub order_id: String,
    /// The order's sequence number in this demo run (0-based).
    pub seq: u64,
    pub sku: String,
    pub quantity: u32,
}

/// The order id of sequence number `seq`.
pub fn order_id(seq: u64) -> String {
    format!("order-{seq:07}")
}

/// One processed order, as the inventory application reports it:
/// `receipt <pod> <partition> <offset> <seq> <sku> <quantity> <remaining-stock>`.
#[derive(Clone, Debug, PartialEq)]
pub struct Receipt {
    pub pod: String,
    pub partition: i32,
    pub offset: i64,
    pub seq: u64,
    pub sku: String,
    pub quantity: u32,
    pub remaining: i64,
}

impl Receipt {
    pub fn to_line(&self) -> String {
        format!(
            "receipt {} {} {} {} {} {} {}\n",
            self.pod,
            self.partition,
            self.offset,
            self.seq,
            self.sku,
            self.quantity,
            self.remaining
        )
    }

    pub fn parse(line: &str) -> Option<Receipt> {
        let mut f = line.split_whitespace();
        if f.next()? != "receipt" {
            return None;
        }
        Some(Receipt {
            pod: f.next()?.to_owned(),
            partition: f.next()?.parse().ok()?,
            offset: f.next()?.parse().ok()?,
            seq: f.next()?.parse().ok()?,
            sku: f.next()?.to_owned(),
            quantity: f.next()?.parse().ok()?,
            remaining: f.next()?.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_survives_its_line() {
        let r = Receipt {
            pod: "inventory-abc".into(),
            partition: 3,
            offset: 42,
            seq: 7,
            sku: "sku-0003".into(),
            quantity: 2,
            remaining: -5,
        };
        assert_eq!(Receipt::parse(r.to_line().trim_end()), Some(r));
        assert_eq!(Receipt::parse("rec a 1 2 3"), None);
    }

    #[test]
    fn order_created_is_camel_case_json() {
        let o = OrderCreated {
            kind: "OrderCreated".into(),
            order_id: order_id(12),
            seq: 12,
            sku: "sku-0001".into(),
            quantity: 1,
        };
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["type"], "OrderCreated");
        assert_eq!(json["orderId"], "order-0000012");
    }
}
