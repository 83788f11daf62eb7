// sarama: a consumer group that handles records in process (no HTTP), as a baseline for
// `make bench`: MarkMessage per record, offsets auto-committed. It counts unique records by
// the "seq" field of each value, and prints one line when it has seen -n of them:
// `first_to_last_s=<seconds from the first unique record to the n-th>`.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/IBM/sarama"
)

type handler struct {
	n     int
	mu    sync.Mutex
	seen  []bool
	count int
	first time.Time
	done  chan time.Duration
}

func (h *handler) Setup(sarama.ConsumerGroupSession) error   { return nil }
func (h *handler) Cleanup(sarama.ConsumerGroupSession) error { return nil }

var seqKey = []byte(`"seq":`)

func seq(value []byte) int {
	i := bytes.Index(value, seqKey)
	if i < 0 {
		return -1
	}
	rest := value[i+len(seqKey):]
	j := 0
	for j < len(rest) && rest[j] >= '0' && rest[j] <= '9' {
		j++
	}
	v, err := strconv.Atoi(string(rest[:j]))
	if err != nil {
		return -1
	}
	return v
}

func (h *handler) ConsumeClaim(sess sarama.ConsumerGroupSession, claim sarama.ConsumerGroupClaim) error {
	for msg := range claim.Messages() {
		s := seq(msg.Value)
		h.mu.Lock()
		if s >= 0 && s < h.n && !h.seen[s] {
			h.seen[s] = true
			if h.count == 0 {
				h.first = time.Now()
			}
			h.count++
			if h.count == h.n {
				h.done <- time.Since(h.first)
			}
		}
		h.mu.Unlock()
		sess.MarkMessage(msg, "")
	}
	return nil
}

func main() {
	brokers := flag.String("brokers", "127.0.0.1:9092", "bootstrap broker")
	topic := flag.String("topic", "", "topic")
	group := flag.String("group", "", "consumer group")
	n := flag.Int("n", 0, "unique records to wait for")
	flag.Parse()
	if *topic == "" || *group == "" || *n <= 0 {
		fmt.Fprintln(os.Stderr, "sarama: -topic, -group and -n are required")
		os.Exit(2)
	}
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V4_0_0_0
	cfg.Consumer.Offsets.Initial = sarama.OffsetOldest
	cfg.Consumer.Offsets.AutoCommit.Enable = true
	cg, err := sarama.NewConsumerGroup([]string{*brokers}, *group, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sarama: group:", err)
		os.Exit(1)
	}
	h := &handler{n: *n, seen: make([]bool, *n), done: make(chan time.Duration, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for ctx.Err() == nil {
			if err := cg.Consume(ctx, []string{*topic}, h); err != nil && ctx.Err() == nil {
				fmt.Fprintln(os.Stderr, "sarama: consume:", err)
				os.Exit(1)
			}
		}
	}()
	took := <-h.done
	fmt.Printf("first_to_last_s=%.6f\n", took.Seconds())
	cancel()
	_ = cg.Close()
}
