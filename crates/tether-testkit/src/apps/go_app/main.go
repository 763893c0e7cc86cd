// The test kit's Go program: an unmodified Go service and client (raw system calls, Go's own
// resolver), built by the tests as a static (CGO_ENABLED=0) and as a cgo binary.
//
//	go_app serve NAME PORT   HTTP on PORT, answering "NAME PORT METHOD PATH from CLIENT_IP";
//	                         prints "listening" once it listens; with SEEN_FILE set, appends
//	                         each answer to that file too
//	go_app spawn NAME PORT   the same, served by a child process it starts (and passes
//	                         SIGINT and SIGTERM on to)
//	go_app context           prints what it sees of the pod (POD_DIR, HTTP_PORT, UDP_PORT,
//	                         DNS_NAME in the environment), one "key value" line each
//	go_app write PATH TEXT   writes TEXT to PATH, reads it back
//	go_app move PATH         makes PATH.d, moves PATH into it, makes and removes a file there
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: go_app serve|spawn NAME PORT | context")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2], os.Args[3])
	case "spawn":
		child := exec.Command(os.Args[0], "serve", os.Args[2], os.Args[3])
		child.Stdout, child.Stderr = os.Stdout, os.Stderr
		if err := child.Start(); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		// Signals go on to the child; its end is this process's.
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
		go func() {
			for s := range signals {
				child.Process.Signal(s)
			}
		}()
		child.Wait()
		os.Exit(child.ProcessState.ExitCode())
	case "context":
		showContext()
	case "write":
		err := os.WriteFile(os.Args[2], []byte(os.Args[3]+"\n"), 0o644)
		show("write", "done", err)
		data, err := os.ReadFile(os.Args[2])
		show("read-back", strings.TrimSpace(string(data)), err)
	case "move":
		// move PATH: into a new directory PATH.d, as PATH.d/moved; PATH.d/gone made and removed.
		dir := os.Args[2] + ".d"
		show("mkdir", "done", os.Mkdir(dir, 0o755))
		show("rename", "done", os.Rename(os.Args[2], dir+"/moved"))
		show("create", "done", os.WriteFile(dir+"/gone", []byte("x"), 0o644))
		show("remove", "done", os.Remove(dir+"/gone"))
		entries, err := os.ReadDir(dir)
		names := []string{}
		for _, entry := range entries {
			names = append(names, entry.Name())
		}
		show("listed", strings.Join(names, ","), err)
	}
}

func serve(name, port string) {
	listener, err := net.Listen("tcp", ":"+port)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	fmt.Println("listening")
	seen := os.Getenv("SEEN_FILE")
	handler := func(w http.ResponseWriter, r *http.Request) {
		client, _, _ := net.SplitHostPort(r.RemoteAddr)
		answer := fmt.Sprintf("%s %s %s %s from %s\n", name, port, r.Method, r.URL.Path, client)
		if seen != "" {
			if file, err := os.OpenFile(seen, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
				file.WriteString(answer)
				file.Close()
			}
		}
		fmt.Fprint(w, answer)
	}
	if err := http.Serve(listener, http.HandlerFunc(handler)); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
}

func show(key string, value interface{}, err error) {
	if err != nil {
		fmt.Printf("%s error: %v\n", key, err)
		return
	}
	fmt.Printf("%s %v\n", key, value)
}

func get(url string) (string, error) {
	client := http.Client{Timeout: 10 * time.Second}
	response, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer response.Body.Close()
	body, err := io.ReadAll(response.Body)
	return strings.TrimSpace(string(body)), err
}

func showContext() {
	dir, port, udp := os.Getenv("POD_DIR"), os.Getenv("HTTP_PORT"), os.Getenv("UDP_PORT")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	show("env", os.Getenv("POD_ONLY_VAR"), nil)
	data, err := os.ReadFile(dir + "/secret.txt")
	show("file", strings.TrimSpace(string(data)), err)
	info, err := os.Stat(dir + "/secret.txt")
	if err == nil {
		show("stat", info.Size(), nil)
	} else {
		show("stat", nil, err)
	}
	entries, err := os.ReadDir(dir)
	names := []string{}
	for _, entry := range entries {
		names = append(names, entry.Name())
	}
	sort.Strings(names)
	show("readdir", strings.Join(names, ","), err)

	ips, err := net.DefaultResolver.LookupIP(ctx, "ip4", "db.pod.internal")
	show("hosts", ips, err)
	if name := os.Getenv("DNS_NAME"); name != "" {
		ips, err := net.DefaultResolver.LookupIP(ctx, "ip4", name)
		show("dns", ips, err)
	}
	if len(ips) > 0 {
		body, err := get(fmt.Sprintf("http://%s:%s/go-ip", ips[0], port))
		show("http-ip", body, err)
		connection, err := net.DialTimeout("tcp", net.JoinHostPort(ips[0].String(), port), 10*time.Second)
		if err == nil {
			show("peer", connection.RemoteAddr().(*net.TCPAddr).IP, nil)
			connection.Close()
		} else {
			show("peer", nil, err)
		}
	}
	body, err := get(fmt.Sprintf("http://db.pod.internal:%s/go-name", port))
	show("http-name", body, err)
	if name := os.Getenv("DNS_NAME"); name != "" {
		body, err := get(fmt.Sprintf("http://%s:%s/go-dns", name, port))
		show("http-dns", body, err)
	}

	connection, err := net.DialTimeout("udp", "db.pod.internal:"+udp, 10*time.Second)
	if err == nil {
		connection.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = connection.Write([]byte("hello"))
		buffer := make([]byte, 100)
		n := 0
		if err == nil {
			n, err = connection.Read(buffer)
		}
		show("udp", string(buffer[:n]), err)
		connection.Close()
	} else {
		show("udp", nil, err)
	}
}
