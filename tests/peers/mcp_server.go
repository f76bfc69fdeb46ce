// A real MCP server in Go, decoding requests with encoding/json the way Go MCP SDKs do
// (json.NewDecoder(body).Decode, then json.Unmarshal into structs: keys matched to fields
// case-insensitively with Unicode case folding, the last of duplicate keys kept, anything after
// the first value ignored), for guard's tests. The same tools and call log as mcp_server.py
// (echo, add, delete_file, fetch_tasks; one JSON line {"tool", "arguments"} per tools/call it
// runs), so that a test can decide from the server side whether a call ran. Streamable HTTP
// with JSON answers (a batch is answered with an array).
//
//	mcp_server_go [--host 127.0.0.3] [--port 0] [--log FILE]
//
// Prints exactly one line to stdout, `READY http://HOST:PORT/mcp`, once it listens. Only the
// standard library: `cargo xtask setup` builds it with Debian's Go.
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
)

type request struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id,omitempty"`
	Method  string          `json:"method"`
	Params  json.RawMessage `json:"params,omitempty"`
}

type callParams struct {
	Name      string                 `json:"name"`
	Arguments map[string]interface{} `json:"arguments"`
}

type initParams struct {
	ProtocolVersion string `json:"protocolVersion"`
}

var (
	logPath string
	logMu   sync.Mutex
)

func logCall(tool string, args map[string]interface{}) {
	if logPath == "" {
		return
	}
	line, _ := json.Marshal(map[string]interface{}{"tool": tool, "arguments": args})
	logMu.Lock()
	defer logMu.Unlock()
	f, err := os.OpenFile(logPath, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o666)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mcp_server_go:", err)
		return
	}
	defer f.Close()
	f.Write(append(line, '\n'))
}

func schema(props map[string]string, required ...string) map[string]interface{} {
	p := map[string]interface{}{}
	for k, t := range props {
		if t == "array" {
			p[k] = map[string]interface{}{"type": "array", "items": map[string]string{"type": "integer"}}
		} else {
			p[k] = map[string]string{"type": t}
		}
	}
	return map[string]interface{}{"type": "object", "properties": p, "required": required}
}

var tools = []map[string]interface{}{
	{"name": "echo", "description": "Echo the given text back unchanged.",
		"inputSchema": schema(map[string]string{"text": "string"}, "text")},
	{"name": "add", "description": "Add two integers.",
		"inputSchema": schema(map[string]string{"a": "integer", "b": "integer"}, "a", "b")},
	{"name": "delete_file", "description": "Delete a file (pretends to: nothing is deleted).",
		"inputSchema": schema(map[string]string{"path": "string"}, "path")},
	{"name": "fetch_tasks", "description": "Fetch tasks by id; returns how many ids were asked for.",
		"inputSchema": schema(map[string]string{"task_ids": "array"}, "task_ids")},
}

func text(t string) map[string]interface{} {
	return map[string]interface{}{"content": []map[string]string{{"type": "text", "text": t}}}
}

func num(v interface{}) float64 {
	f, _ := v.(float64)
	return f
}

// call runs a tool (after logging it, as the Python server does).
func call(p callParams) (interface{}, *rpcError) {
	logCall(p.Name, p.Arguments)
	a := p.Arguments
	switch p.Name {
	case "echo":
		s, _ := a["text"].(string)
		return text(s), nil
	case "add":
		return text(strconv.FormatFloat(num(a["a"])+num(a["b"]), 'f', -1, 64)), nil
	case "delete_file":
		s, _ := a["path"].(string)
		return text("deleted " + s), nil
	case "fetch_tasks":
		ids, _ := a["task_ids"].([]interface{})
		return text(strconv.Itoa(len(ids))), nil
	}
	return nil, &rpcError{Code: -32602, Message: "unknown tool " + p.Name}
}

type rpcError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// handle answers one message; nil for notifications.
func handle(req request) map[string]interface{} {
	var result interface{}
	var rerr *rpcError
	switch req.Method {
	case "initialize":
		var p initParams
		json.Unmarshal(req.Params, &p)
		if p.ProtocolVersion == "" {
			p.ProtocolVersion = "2025-06-18"
		}
		result = map[string]interface{}{
			"protocolVersion": p.ProtocolVersion,
			"capabilities":    map[string]interface{}{"tools": map[string]interface{}{}},
			"serverInfo":      map[string]string{"name": "guard-go-test-server", "version": "1.0.0"},
		}
	case "ping":
		result = map[string]interface{}{}
	case "tools/list":
		result = map[string]interface{}{"tools": tools}
	case "tools/call":
		var p callParams
		if err := json.Unmarshal(req.Params, &p); err != nil {
			rerr = &rpcError{Code: -32602, Message: err.Error()}
		} else {
			result, rerr = call(p)
		}
	default:
		if len(req.ID) == 0 {
			return nil
		}
		rerr = &rpcError{Code: -32601, Message: "method not found: " + req.Method}
	}
	if len(req.ID) == 0 {
		return nil
	}
	out := map[string]interface{}{"jsonrpc": "2.0", "id": req.ID}
	if rerr != nil {
		out["error"] = rerr
	} else {
		out["result"] = result
	}
	return out
}

func serve(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	var raw json.RawMessage
	// As mcp-go does: the first JSON value of the body; whatever follows is not read.
	if err := json.NewDecoder(r.Body).Decode(&raw); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var reqs []request
	batch := len(bytes.TrimLeft(raw, " \t\r\n")) > 0 && bytes.TrimLeft(raw, " \t\r\n")[0] == '['
	if batch {
		if err := json.Unmarshal(raw, &reqs); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
	} else {
		var one request
		if err := json.Unmarshal(raw, &one); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		reqs = []request{one}
	}
	var answers []map[string]interface{}
	for _, q := range reqs {
		if q.Method == "initialize" {
			b := make([]byte, 16)
			rand.Read(b)
			w.Header().Set("Mcp-Session-Id", hex.EncodeToString(b))
		}
		if a := handle(q); a != nil {
			answers = append(answers, a)
		}
	}
	if len(answers) == 0 {
		w.WriteHeader(http.StatusAccepted)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if batch {
		json.NewEncoder(w).Encode(answers)
	} else {
		json.NewEncoder(w).Encode(answers[0])
	}
}

func main() {
	host := flag.String("host", "127.0.0.1", "address to bind")
	port := flag.Int("port", 0, "port; 0 = any free one (see the READY line)")
	flag.StringVar(&logPath, "log", "", "append one JSON line per tools/call run to this file")
	flag.Parse()
	l, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		fmt.Fprintln(os.Stderr, "mcp_server_go:", err)
		os.Exit(1)
	}
	addr := l.Addr().(*net.TCPAddr)
	fmt.Printf("READY http://%s/mcp\n", net.JoinHostPort(addr.IP.String(), strconv.Itoa(addr.Port)))
	mux := http.NewServeMux()
	mux.HandleFunc("/mcp", serve)
	if err := http.Serve(l, mux); err != nil {
		fmt.Fprintln(os.Stderr, "mcp_server_go:", err)
		os.Exit(1)
	}
}
