// Open-loop load generator for fraud.v1.FraudScoring/ScoreStream.
//
// Requests are sent on a fixed schedule (rate), spread over several streams (one HTTP/2
// connection each, so SO_REUSEPORT spreads them over server processes). Latency is measured
// from the *intended* send time, so a server that stalls the sender is charged for it
// (no coordinated omission). Messages are encoded by hand with protowire and sent through a
// bytes codec: no generated Go code, and the generator stays cheap next to the server.
// Prints one JSON object.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/rand"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/protobuf/encoding/protowire"
)

type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(b []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), b...)
	return nil
}
func (rawCodec) Name() string { return "raw" }

func init() { encoding.RegisterCodec(rawCodec{}) }

func scoreRequest(id string, customer, terminal int64, amount float64, budgetUs uint64) []byte {
	var tx []byte
	tx = protowire.AppendTag(tx, 1, protowire.BytesType)
	tx = protowire.AppendString(tx, "tx-"+id)
	tx = protowire.AppendTag(tx, 2, protowire.VarintType)
	tx = protowire.AppendVarint(tx, uint64(customer))
	tx = protowire.AppendTag(tx, 3, protowire.VarintType)
	tx = protowire.AppendVarint(tx, uint64(terminal))
	tx = protowire.AppendTag(tx, 4, protowire.Fixed64Type)
	tx = protowire.AppendFixed64(tx, mathFloat64bits(amount))
	tx = protowire.AppendTag(tx, 5, protowire.VarintType)
	tx = protowire.AppendVarint(tx, uint64(time.Now().UnixMicro()))
	tx = protowire.AppendTag(tx, 6, protowire.BytesType)
	tx = protowire.AppendString(tx, "EUR")
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendString(b, id)
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendBytes(b, tx)
	if budgetUs > 0 {
		b = protowire.AppendTag(b, 3, protowire.VarintType)
		b = protowire.AppendVarint(b, budgetUs)
	}
	return b
}

// parseResponse returns request_id, whether it is an error, and the degraded cause (0 none).
func parseResponse(b []byte) (id string, isError bool, cause uint64) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, m := protowire.ConsumeString(b)
			id, b = v, b[m:]
		case num == 2 && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			cause = decisionCause(v)
			b = b[m:]
		case num == 3:
			isError = true
			m := protowire.ConsumeFieldValue(num, typ, b)
			b = b[m:]
		default:
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return
			}
			b = b[m:]
		}
	}
	return
}

func decisionCause(b []byte) uint64 {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		b = b[n:]
		if num == 7 && typ == protowire.VarintType {
			v, _ := protowire.ConsumeVarint(b)
			return v
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return 0
		}
		b = b[m:]
	}
	return 0
}

type result struct {
	Offered   float64        `json:"offered_rps"`
	Achieved  float64        `json:"achieved_rps"`
	Sent      int            `json:"sent"`
	Received  int            `json:"received"`
	Errors    int            `json:"errors"`
	Degraded  map[string]int `json:"degraded_by_cause"`
	P50us     float64        `json:"p50_us"`
	P99us     float64        `json:"p99_us"`
	P999us    float64        `json:"p999_us"`
	MaxUs     float64        `json:"max_us"`
	DurationS float64        `json:"duration_s"`
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "")
	rate := flag.Float64("rate", 1000, "requests per second, all streams together")
	duration := flag.Duration("duration", 5*time.Second, "measured period")
	warmup := flag.Duration("warmup", 1*time.Second, "sent at the same rate, not measured")
	streams := flag.Int("streams", 8, "streams, one connection each")
	budget := flag.Uint64("budget-us", 0, "budget per request (0: server default)")
	customers := flag.Int64("customers", 5000, "")
	terminals := flag.Int64("terminals", 1000, "")
	flag.Parse()

	desc := &grpc.StreamDesc{StreamName: "ScoreStream", ServerStreams: true, ClientStreams: true}
	total := int((*warmup + *duration).Seconds() * *rate)
	warmupCount := int(warmup.Seconds() * *rate)
	intended := make([]int64, total) // ns since start, per request index
	latencies := make([]int64, total)
	for i := range latencies {
		latencies[i] = -1
	}
	var errorsN, received int64
	causes := make([]int64, 8)
	start := time.Now()
	interval := float64(time.Second) / *rate

	var wg sync.WaitGroup
	var sendWg sync.WaitGroup
	for s := 0; s < *streams; s++ {
		conn, err := grpc.NewClient(*target, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		stream, err := conn.NewStream(context.Background(), desc, "/fraud.v1.FraudScoring/ScoreStream")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		wg.Add(1)
		go func() { // receiver
			defer wg.Done()
			for {
				var msg []byte
				if err := stream.RecvMsg(&msg); err != nil {
					return
				}
				now := time.Since(start).Nanoseconds()
				id, isErr, cause := parseResponse(msg)
				i, _ := strconv.Atoi(id)
				if isErr {
					atomic.AddInt64(&errorsN, 1)
				}
				if i >= warmupCount {
					atomic.AddInt64(&causes[cause&7], 1)
				}
				atomic.StoreInt64(&latencies[i], now-atomic.LoadInt64(&intended[i]))
				atomic.AddInt64(&received, 1)
			}
		}()
		sendWg.Add(1)
		go func(s int) { // sender: every streams-th request of the global schedule
			defer sendWg.Done()
			rng := rand.New(rand.NewSource(int64(s)))
			for i := s; i < total; i += *streams {
				at := int64(float64(i) * interval)
				atomic.StoreInt64(&intended[i], at)
				if d := time.Duration(at - time.Since(start).Nanoseconds()); d > 0 {
					time.Sleep(d)
				}
				msg := scoreRequest(strconv.Itoa(i), rng.Int63n(*customers), rng.Int63n(*terminals), 5+rng.Float64()*300, *budget)
				if err := stream.SendMsg(&msg); err != nil {
					return
				}
			}
			stream.CloseSend()
		}(s)
	}
	sendWg.Wait()
	sentDone := time.Since(start)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
	}
	elapsed := time.Since(start)
	measured := []float64{}
	for i := warmupCount; i < total; i++ {
		if l := atomic.LoadInt64(&latencies[i]); l >= 0 {
			measured = append(measured, float64(l)/1000)
		} else {
			measured = append(measured, float64(elapsed.Nanoseconds()-intended[i])/1000) // never answered: charge until the end
		}
	}
	sort.Float64s(measured)
	pct := func(p float64) float64 { return measured[int(p*float64(len(measured)-1))] }
	names := []string{"none", "features_unavailable", "model_unavailable", "budget_exceeded", "overloaded", "5", "6", "7"}
	degraded := map[string]int{}
	for c, n := range causes {
		if c > 0 && n > 0 {
			degraded[names[c]] = int(n)
		}
	}
	measuredReceived := 0
	for i := warmupCount; i < total; i++ {
		if latencies[i] >= 0 {
			measuredReceived++
		}
	}
	lastAnswer := sentDone.Seconds()
	res := result{
		Offered: *rate, Sent: total - warmupCount, Received: measuredReceived, Errors: int(errorsN),
		Degraded: degraded, P50us: pct(0.50), P99us: pct(0.99), P999us: pct(0.999), MaxUs: measured[len(measured)-1],
		DurationS: duration.Seconds(),
	}
	res.Achieved = float64(measuredReceived) / (lastAnswer - warmup.Seconds())
	json.NewEncoder(os.Stdout).Encode(res)
}

func mathFloat64bits(f float64) uint64 { return math.Float64bits(f) }
