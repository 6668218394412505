// Command grpc-harness is the load generator and the upstream of bench/grpc_unary.py: a gRPC
// (grpc-go) echo server that counts the calls carrying the expected header, and a client that
// sends unary calls with a fixed number in flight on one connection and checks every answer.
// Compiled code on both ends, so that the proxies, not the harness, bound the calls/s.
//
//	grpc-harness serve [-header x-api-key -value KEY]     prints "listening HOST:PORT"
//	grpc-harness load -target HOST:PORT -calls N -concurrency C -size B [-header H -value V]
//	                                                       prints one JSON line
//	grpc-harness stats -target HOST:PORT                   prints "ACCEPTED REFUSED"
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	echo  = "/bench.Echo/Unary"
	stats = "/bench.Echo/Stats" // "accepted refused": the calls seen since start
)

// raw passes messages as bytes: no generated code, the same calls as the Python bench.
type raw struct{}

func (raw) Name() string { return "proto" }

func (raw) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }

func (raw) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}

func serve(args []string) error {
	flags := flag.NewFlagSet("serve", flag.ExitOnError)
	listen := flags.String("listen", "127.0.0.1:0", "address")
	header := flags.String("header", "", "metadata every call must carry (empty: none)")
	value := flags.String("value", "", "its value")
	flags.Parse(args)
	var accepted, refused atomic.Int64
	handler := func(_ any, stream grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(stream)
		var message []byte
		if err := stream.RecvMsg(&message); err != nil {
			return err
		}
		if method == stats {
			answer := []byte(fmt.Sprintf("%d %d", accepted.Load(), refused.Load()))
			return stream.SendMsg(&answer)
		}
		if *header != "" {
			md, _ := metadata.FromIncomingContext(stream.Context())
			if got := md.Get(*header); len(got) != 1 || got[0] != *value {
				refused.Add(1)
				return status.Error(codes.Unauthenticated, "missing or wrong "+*header)
			}
		}
		accepted.Add(1)
		return stream.SendMsg(&message)
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	server := grpc.NewServer(grpc.UnknownServiceHandler(handler), grpc.ForceServerCodec(raw{}),
		grpc.MaxConcurrentStreams(1024))
	fmt.Printf("listening %s\n", listener.Addr())
	return server.Serve(listener)
}

type result struct {
	Calls    int64   `json:"calls"`
	OK       int64   `json:"ok"`
	Failed   int64   `json:"failed"`
	Seconds  float64 `json:"seconds"`
	PerS     float64 `json:"calls_per_s"`
	FirstErr string  `json:"first_error,omitempty"`
}

func load(args []string) error {
	flags := flag.NewFlagSet("load", flag.ExitOnError)
	target := flags.String("target", "", "HOST:PORT")
	calls := flags.Int64("calls", 20000, "unary calls")
	concurrency := flags.Int("concurrency", 32, "calls in flight on the one connection")
	size := flags.Int("size", 64, "message bytes")
	header := flags.String("header", "", "metadata to send with every call (the direct path)")
	value := flags.String("value", "", "its value")
	flags.Parse(args)
	conn, err := grpc.NewClient(*target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(raw{})))
	if err != nil {
		return err
	}
	defer conn.Close()
	request := bytes.Repeat([]byte("x"), *size)
	ctx := context.Background()
	if *header != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, *header, *value)
	}
	var warm []byte
	if err := conn.Invoke(ctx, echo, &request, &warm); err != nil { // connect, and one call
		return fmt.Errorf("warm-up call: %w", err)
	}
	var next, ok, failed atomic.Int64
	var firstErr atomic.Value
	var wait sync.WaitGroup
	started := time.Now()
	for range *concurrency {
		wait.Add(1)
		go func() {
			defer wait.Done()
			for next.Add(1) <= *calls {
				var answer []byte
				callCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
				err := conn.Invoke(callCtx, echo, &request, &answer)
				cancel()
				if err == nil && bytes.Equal(answer, request) {
					ok.Add(1)
					continue
				}
				failed.Add(1)
				if err == nil {
					err = fmt.Errorf("answer of %d bytes is not the request", len(answer))
				}
				firstErr.CompareAndSwap(nil, err.Error())
			}
		}()
	}
	wait.Wait()
	seconds := time.Since(started).Seconds()
	out := result{Calls: *calls, OK: ok.Load(), Failed: failed.Load(), Seconds: seconds,
		PerS: float64(ok.Load()) / seconds}
	if e, set := firstErr.Load().(string); set {
		out.FirstErr = e
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

func statsOf(args []string) error {
	flags := flag.NewFlagSet("stats", flag.ExitOnError)
	target := flags.String("target", "", "the server's HOST:PORT")
	flags.Parse(args)
	conn, err := grpc.NewClient(*target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(raw{})))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	request, answer := []byte{}, []byte{}
	if err := conn.Invoke(ctx, stats, &request, &answer); err != nil {
		return err
	}
	fmt.Println(string(answer))
	return nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: grpc-harness serve|load|stats [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "load":
		err = load(os.Args[2:])
	case "stats":
		err = statsOf(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpc-harness:", err)
		os.Exit(1)
	}
}
