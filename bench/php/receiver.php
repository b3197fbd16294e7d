<?php
// What integrators write today: a Response URL in PHP behind nginx. It checks the policy's Basic
// credentials, pulls the control-level controlid out of the body with a regular expression,
// and writes the body to a file named by it, fsync'd (fsync() exists since PHP 8.1).
// Configured by php-fpm pool variables: BENCH_USER, BENCH_PASSWORD, BENCH_DIR.

$user = $_SERVER['PHP_AUTH_USER'] ?? null;
$password = $_SERVER['PHP_AUTH_PW'] ?? null;
if ($user === null && isset($_SERVER['HTTP_AUTHORIZATION'])
    && strncasecmp($_SERVER['HTTP_AUTHORIZATION'], 'Basic ', 6) === 0) {
    $pair = explode(':', (string) base64_decode(substr($_SERVER['HTTP_AUTHORIZATION'], 6)), 2);
    $user = $pair[0];
    $password = $pair[1] ?? '';
}
if (!is_string($user) || !hash_equals(getenv('BENCH_USER'), $user)
    || !hash_equals(getenv('BENCH_PASSWORD'), (string) $password)) {
    http_response_code(401);
    header('WWW-Authenticate: Basic realm="callbacks"');
    exit;
}

$body = file_get_contents('php://input');
if (!preg_match('~<control>.*?<controlid>\s*([^<]*?)\s*</controlid>~s', $body, $m) || $m[1] === '') {
    http_response_code(400);
    echo "no controlid\n";
    exit;
}
$controlid = html_entity_decode($m[1], ENT_QUOTES | ENT_XML1, 'UTF-8');

$path = getenv('BENCH_DIR') . '/' . rawurlencode($controlid) . '.xml';
$f = fopen($path, 'wb');
if ($f === false || fwrite($f, $body) !== strlen($body) || !fflush($f) || !fsync($f)) {
    http_response_code(503);
    exit;
}
fclose($f);

header('Content-Type: application/json');
echo json_encode(['status' => 'stored', 'controlid' => $controlid]), "\n";
