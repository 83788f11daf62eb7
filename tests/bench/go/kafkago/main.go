// kafkago: the consumer most tutorials teach, as a baseline for `make bench`: kafka-go's
// FetchMessage, one POST of the record's value to the application, then CommitMessages for
// that record (or, with -commit-interval, commits batched by the reader).
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/segmentio/kafka-go"
)

func main() {
	brokers := flag.String("brokers", "127.0.0.1:9092", "bootstrap broker")
	topic := flag.String("topic", "", "topic")
	group := flag.String("group", "", "consumer group")
	url := flag.String("url", "", "application URL")
	commitInterval := flag.Duration("commit-interval", 0, "0: commit every record synchronously")
	flag.Parse()
	if *topic == "" || *group == "" || *url == "" {
		fmt.Fprintln(os.Stderr, "kafkago: -topic, -group and -url are required")
		os.Exit(2)
	}
	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers:        []string{*brokers},
		GroupID:        *group,
		Topic:          *topic,
		StartOffset:    kafka.FirstOffset,
		CommitInterval: *commitInterval,
		MaxBytes:       10 << 20,
	})
	defer r.Close()
	client := &http.Client{Timeout: 10 * time.Second}
	ctx := context.Background()
	for {
		m, err := r.FetchMessage(ctx)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kafkago: fetch:", err)
			os.Exit(1)
		}
		req, _ := http.NewRequest(http.MethodPost, *url, bytes.NewReader(m.Value))
		req.Header.Set("content-type", "application/json")
		req.Header.Set("kafka-partition", strconv.Itoa(m.Partition))
		req.Header.Set("kafka-offset", strconv.FormatInt(m.Offset, 10))
		resp, err := client.Do(req)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kafkago: post:", err)
			os.Exit(1)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err := r.CommitMessages(ctx, m); err != nil {
			fmt.Fprintln(os.Stderr, "kafkago: commit:", err)
			os.Exit(1)
		}
	}
}
