// Go net/http HTTPS server (standard library only) for the end-to-end suite. PORT, TLS_CERT and
// TLS_KEY configure it; HTTP2=0 forces HTTP/1.1. UPSTREAM (an https base URL, trusted through
// UPSTREAM_CA) is what /call/... handlers call, from the handler's goroutine (/call/direct) or
// from a goroutine the handler starts (/call/spawned), over HTTP/2 when UPSTREAM_HTTP2=1 (else
// HTTP/1.1: a custom TLS configuration turns net/http's HTTP/2 off). GO_CLIENT=URL turns the program into a
// client that keeps one connection open and sends a request on it at every line of stdin.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
)

const bigBodyBytes = 2 * 1024 * 1024

func bigBody() []byte {
	body := make([]byte, bigBodyBytes)
	for i := range body {
		body[i] = byte(i % 256)
	}
	return body
}

func upstreamClient() *http.Client {
	roots := x509.NewCertPool()
	if pem, err := os.ReadFile(os.Getenv("UPSTREAM_CA")); err == nil {
		roots.AppendCertsFromPEM(pem)
	}
	transport := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		ForceAttemptHTTP2: os.Getenv("UPSTREAM_HTTP2") == "1",
	}
	return &http.Client{Transport: transport}
}

// call sends GET upstream+path and returns the response body.
func call(client *http.Client, path string) (string, error) {
	response, err := client.Get(os.Getenv("UPSTREAM") + path)
	if err != nil {
		return "", err
	}
	defer response.Body.Close()
	body, err := io.ReadAll(response.Body)
	return string(body), err
}

func handler(client *http.Client) http.HandlerFunc {
	big := bigBody()
	return func(w http.ResponseWriter, r *http.Request) {
		received, _ := io.ReadAll(r.Body)
		switch {
		case r.URL.Path == "/big":
			w.Header().Set("Content-Type", "application/octet-stream")
			w.Write(big)
			return
		case strings.HasPrefix(r.URL.Path, "/call/direct/"):
			id := strings.TrimPrefix(r.URL.Path, "/call/direct/")
			body, err := call(client, "/downstream/"+id)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadGateway)
				return
			}
			received = []byte(body)
		case strings.HasPrefix(r.URL.Path, "/call/spawned/"):
			id := strings.TrimPrefix(r.URL.Path, "/call/spawned/")
			done := make(chan string)
			go func() {
				body, err := call(client, "/downstream/"+id)
				if err != nil {
					body = err.Error()
				}
				done <- body
			}()
			received = []byte(<-done)
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{"path": r.URL.RequestURI(), "proto": r.Proto, "received": string(received)})
	}
}

func serve() {
	server := &http.Server{Addr: "127.0.0.1:" + os.Getenv("PORT"), Handler: handler(upstreamClient())}
	if os.Getenv("HTTP2") == "0" {
		// A non-nil empty map turns off the automatic HTTP/2.
		server.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
	}
	err := server.ListenAndServeTLS(os.Getenv("TLS_CERT"), os.Getenv("TLS_KEY"))
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

// client keeps one keep-alive connection to GO_CLIENT and sends a GET for every line of stdin
// (the line is the path), printing each response body on a line.
func client(base string) {
	client := upstreamClient()
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		response, err := client.Get(base + lines.Text())
		if err != nil {
			fmt.Println("error:", err)
			continue
		}
		body, _ := io.ReadAll(response.Body)
		response.Body.Close()
		fmt.Println(string(body))
	}
}

func main() {
	if base := os.Getenv("GO_CLIENT"); base != "" {
		client(base)
		return
	}
	serve()
}
